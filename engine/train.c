/* train.c: L_simple for a UNet, cross-entropy for a noisy classifier; AdamW,
 * EMA, checkpoints that resume bit for bit, a CSV log and its plot.
 *
 * Legend: B batch, C channels, H, W image size, K classes, P parameters
 * (all weights of the network, flattened in df_unet_params order).
 *
 * Randomness is keyed, never carried: sample i of step s draws its data
 * index, flip, timestep and label drop from df_rng_u64 (seed, DATA + i, s, .)
 * and its noise from df_rng_normal (seed, i, s).  A checkpoint therefore only
 * needs the weights, the EMA, Adam's moments and s.
 */
#include "train.h"

#include <cairo.h>
#include <errno.h>
#include <json-glib/json-glib.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>

#include <glib/gstdio.h>
#include <unistd.h>

#include "rng.h"
#include "safetensors.h"
#include "tensor-private.h"

/* Stream indices of the per-sample draws other than the noise, far from the
 * noise streams (index i) so the two never share a Philox key. */
#define DATA_STREAM   ((guint64) 1 << 40)
#define POS_INDEX     0
#define POS_FLIP      1
#define POS_TIMESTEP  2
#define POS_DROP      3

/* Optimiser loops run over chunks of this many weights: balanced across
 * threads, and each chunk's sum of squares is taken in one fixed order. */
#define CHUNK         32768
#define SMOOTHING     0.98

G_DEFINE_QUARK (df-train-error-quark, df_train_error)

typedef struct {
  int   param;
  gsize begin, end;          /* within the parameter */
} Chunk;

struct _DfTrainer {
  DfModel          *model;
  DfUNet           *net;
  const DfDataset  *data;
  const DfSchedule *schedule;
  DfTrainOptions    o;       /* its strings point at the copies below */
  char             *checkpoint, *log_csv, *output;

  gboolean          classifier;
  gboolean          conditional;   /* UNet with a class embedding */
  int               uncond;        /* label of dropped samples, or -1 */

  const DfParam    *params;
  int               n_params;
  gsize            *offset;        /* [n_params + 1] into the flat buffers */
  gboolean         *decay;         /* [n_params] weight decay applies */
  gsize             n_weights;     /* P */
  float            *ema;           /* [P] */
  float            *adam_m;        /* [P] */
  float            *adam_v;        /* [P] */
  float            *live;          /* [P] weights while the EMA is saved */
  Chunk            *chunks;
  int               n_chunks;
  double           *chunk_sq;      /* [n_chunks] */

  DfGraph          *graph;
  float            *eps;           /* [B,C,H,W] noise, the UNet's target */
  float            *tsteps;        /* [B] */
  int              *labels;        /* [B] */

  int               step;          /* steps done */
  double            smoothed;
  gboolean          have_smoothed;
  int               saved_step;    /* of the last checkpoint, or -1 */
  GArray           *changes;       /* DfTrainChange, set by resume */
};

void
df_train_options_init (DfTrainOptions *o)
{
  g_return_if_fail (o != NULL);

  memset (o, 0, sizeof *o);
  o->steps = 10000;
  o->batch = 64;
  o->lr = 2e-4;
  o->warmup = 500;
  o->lr_schedule = DF_LR_COSINE;
  o->weight_decay = 0.0;
  o->beta1 = 0.9;
  o->beta2 = 0.999;
  o->adam_eps = 1e-8;
  o->ema_decay = 0.9999;
  o->grad_clip = 1.0;
  o->p_uncond = 0.1;
  o->hflip = FALSE;
  o->seed = 0;
  o->checkpoint = NULL;
  o->checkpoint_minutes = 10.0;
  o->resume = FALSE;
  o->log_csv = NULL;
  o->output = NULL;
}

/* ---- set-up ---- */

/* Hours of training must not end in "cannot write": every file the run
 * will write needs a folder that exists and can be written to. */
static gboolean
check_writable (const char *what, const char *path, GError **error)
{
  char *dir;
  gboolean ok;

  if (path == NULL)
    return TRUE;
  dir = g_path_get_dirname (path);
  ok = g_file_test (dir, G_FILE_TEST_IS_DIR) && g_access (dir, W_OK) == 0
       && !g_file_test (path, G_FILE_TEST_IS_DIR);
  if (!ok)
    g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                 "%s %s cannot be written: %s is not a folder that can be "
                 "written to (create it first)%s", what, path, dir,
                 g_file_test (path, G_FILE_TEST_IS_DIR)
                 ? ", or the path is a folder" : "");
  g_free (dir);
  return ok;
}

static gboolean
check_options (const DfTrainOptions *o, GError **error)
{
  const char *bad = NULL;

  if (o->steps < 0)
    bad = "steps must be >= 0";
  else if (o->batch < 1)
    bad = "the batch size must be >= 1";
  else if (!(o->lr > 0) || !isfinite (o->lr))
    bad = "the learning rate must be > 0";
  else if (o->warmup < 0)
    bad = "warm-up steps must be >= 0";
  else if (!(o->weight_decay >= 0) || !isfinite (o->weight_decay))
    bad = "weight decay must be finite and >= 0";
  else if (o->lr * o->weight_decay >= 1)
    bad = "the learning rate times the weight decay must be below 1 (the "
          "weights would shrink by more than themselves in a step)";
  else if (!(o->beta1 >= 0 && o->beta1 < 1) || !(o->beta2 >= 0 && o->beta2 < 1))
    bad = "Adam's betas must be in [0, 1)";
  else if (!(o->adam_eps > 0))
    bad = "Adam's epsilon must be > 0";
  else if (!(o->ema_decay >= 0 && o->ema_decay <= 1))
    bad = "the EMA decay must be in [0, 1]";
  else if (!(o->grad_clip >= 0))
    bad = "the gradient clip must be >= 0 (0: off)";
  else if (!(o->p_uncond >= 0 && o->p_uncond <= 1))
    bad = "p_uncond must be in [0, 1]";
  else if (o->resume && o->checkpoint == NULL)
    bad = "resuming needs a checkpoint path";
  if (bad != NULL)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "invalid training options: %s", bad);
      return FALSE;
    }
  return TRUE;
}

/* Norm gains, biases and embedding tables are not decayed (the usual
 * practice: decay pulls them towards 0, which is not a prior for them). */
static gboolean
param_decays (const DfParam *p)
{
  return p->tensor->ndim >= 2
         && !g_str_has_prefix (p->name, "class_embedding");
}

DfTrainer *
df_trainer_new (DfModel *m, const DfDataset *data, const DfTrainOptions *o,
                GError **error)
{
  DfTrainer *t;
  const DfUNetConfig *cfg;
  gsize chw;
  int size, channels, B;

  g_return_val_if_fail (m != NULL && data != NULL && o != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  if (!check_options (o, error)
      || !check_writable ("the checkpoint", o->checkpoint, error)
      || !check_writable ("the weights file", o->output, error)
      || !check_writable ("the loss log", o->log_csv, error))
    return NULL;

  /* The data must fit the model. */
  cfg = df_unet_config (df_model_net (m));
  size = df_model_size (m);
  channels = df_model_channels (m);
  if (data->n < 1)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "the data set holds no images");
      return NULL;
    }
  if (data->c != channels || data->h != size || data->w != size)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "the images are %d x %d with %d channel(s) but the model "
                   "takes %d x %d with %d; load the data with that size and "
                   "channel count", data->w, data->h, data->c, size, size,
                   channels);
      return NULL;
    }
  if (df_model_is_classifier (m)
      && cfg->classifier_classes != data->num_classes)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "the classifier has %d classes but the data set %d; make "
                   "the classifier with %d", cfg->classifier_classes,
                   data->num_classes, data->num_classes);
      return NULL;
    }
  if (df_model_is_classifier (m) && cfg->num_class_embeds > 0)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "the classifier has a class embedding, which would give "
                   "it the answer; make it with num_class_embeds 0");
      return NULL;
    }
  if (!df_model_is_classifier (m) && cfg->num_class_embeds > 0
      && (df_model_num_classes (m) != data->num_classes
          || cfg->num_class_embeds < data->num_classes))
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "the model has %d named classes (%d class embeddings) but "
                   "the data set %d; make the model with the data set's "
                   "classes", df_model_num_classes (m), cfg->num_class_embeds,
                   data->num_classes);
      return NULL;
    }

  t = g_new0 (DfTrainer, 1);
  t->model = m;
  t->net = df_model_net (m);
  t->data = data;
  t->schedule = df_model_schedule (m);
  t->o = *o;
  t->checkpoint = g_strdup (o->checkpoint);
  t->log_csv = g_strdup (o->log_csv);
  t->output = g_strdup (o->output);
  t->saved_step = -1;
  t->changes = g_array_new (FALSE, TRUE, sizeof (DfTrainChange));
  t->o.checkpoint = t->checkpoint;
  t->o.log_csv = t->log_csv;
  t->o.output = t->output;
  t->classifier = df_model_is_classifier (m);
  t->conditional = !t->classifier && cfg->num_class_embeds > 0;
  t->uncond = t->conditional ? df_model_uncond_class (m) : -1;
  if (t->uncond >= cfg->num_class_embeds)
    t->uncond = -1;

  /* Parameters: gradients, flat offsets, chunks, optimiser state. */
  t->params = df_unet_params (t->net, &t->n_params);
  t->offset = g_new (gsize, t->n_params + 1);
  t->decay = g_new (gboolean, t->n_params);
  t->offset[0] = 0;
  for (int i = 0; i < t->n_params; i++)
    {
      DfTensor *w = t->params[i].tensor;

      df_tensor_require_grad (w);
      t->decay[i] = param_decays (&t->params[i]);
      t->offset[i + 1] = t->offset[i] + w->size;
      t->n_chunks += (w->size + CHUNK - 1) / CHUNK;
    }
  t->n_weights = t->offset[t->n_params];
  t->chunks = g_new (Chunk, t->n_chunks);
  t->chunk_sq = g_new (double, t->n_chunks);
  for (int i = 0, k = 0; i < t->n_params; i++)
    for (gsize b = 0; b < t->params[i].tensor->size; b += CHUNK, k++)
      {
        t->chunks[k].param = i;
        t->chunks[k].begin = b;
        t->chunks[k].end = MIN (b + CHUNK, t->params[i].tensor->size);
      }
  t->ema = g_new (float, t->n_weights);
  t->adam_m = g_new0 (float, t->n_weights);
  t->adam_v = g_new0 (float, t->n_weights);
  for (int i = 0; i < t->n_params; i++)
    memcpy (t->ema + t->offset[i], t->params[i].tensor->data,
            t->params[i].tensor->size * sizeof (float));

  /* Batch buffers and the one recording graph, reused every step. */
  B = o->batch;
  chw = (gsize) channels * size * size;
  t->graph = df_graph_new (TRUE);
  t->eps = g_new (float, B * chw);
  t->tsteps = g_new (float, B);
  t->labels = g_new (int, B);
  return t;
}

static void
clear_changes (DfTrainer *t)
{
  for (guint i = 0; i < t->changes->len; i++)
    {
      DfTrainChange *c = &g_array_index (t->changes, DfTrainChange, i);

      g_free (c->checkpoint);
      g_free (c->value);
    }
  g_array_set_size (t->changes, 0);
}

void
df_trainer_free (DfTrainer *t)
{
  if (t == NULL)
    return;
  clear_changes (t);
  g_array_free (t->changes, TRUE);
  df_graph_free (t->graph);
  g_free (t->eps);
  g_free (t->tsteps);
  g_free (t->labels);
  g_free (t->offset);
  g_free (t->decay);
  g_free (t->chunks);
  g_free (t->chunk_sq);
  g_free (t->ema);
  g_free (t->adam_m);
  g_free (t->adam_v);
  g_free (t->live);
  g_free (t->checkpoint);
  g_free (t->log_csv);
  g_free (t->output);
  g_free (t);
}

int
df_trainer_step_index (DfTrainer *t)
{
  g_return_val_if_fail (t != NULL, 0);
  return t->step;
}

/* ---- one step ---- */

static double
lr_at (const DfTrainOptions *o, int step)
{
  int span = o->steps - o->warmup;

  if (step < o->warmup)
    return o->lr * (step + 1) / o->warmup;
  if (o->lr_schedule == DF_LR_COSINE && span > 0)
    {
      double p = MIN (1.0, (double) (step - o->warmup) / span);
      return o->lr * 0.5 * (1.0 + cos (G_PI * p));
    }
  return o->lr;
}

/* Uniform in [0, 1) from the top 53 bits. */
static double
u64_to_unit (guint64 r)
{
  return (r >> 11) * (1.0 / 9007199254740992.0);
}

/* x [B,C,H,W] = sqrt(ab) x0 + sqrt(1 - ab) eps for a batch drawn at step s;
 * fills t->eps, t->tsteps and t->labels. */
static void
make_batch (DfTrainer *t, float *x)
{
  const DfDataset *d = t->data;
  const DfTrainOptions *o = &t->o;
  guint32 s = (guint32) t->step;
  int T = t->schedule->T, w = d->w;
  gsize chw = (gsize) d->c * d->h * d->w;

  /* Each sample is independent, so threads cannot change the result. */
#pragma omp parallel for schedule(static)
  for (int i = 0; i < o->batch; i++)
    {
      guint64 key = DATA_STREAM + i;
      int idx = df_rng_u64 (o->seed, key, s, POS_INDEX) % (guint64) d->n;
      gboolean flip = o->hflip
                      && (df_rng_u64 (o->seed, key, s, POS_FLIP) & 1);
      int ts = df_rng_u64 (o->seed, key, s, POS_TIMESTEP) % (guint64) T;
      double ab = t->schedule->alphas_cumprod[ts];
      float a = (float) sqrt (ab), b = (float) sqrt (1.0 - ab);
      const float *x0 = d->images + chw * idx;         /* [C,H,W] */
      float *e = t->eps + chw * i, *xi = x + chw * i;  /* [C,H,W] */
      int label = d->labels[idx];

      df_rng_normal (o->seed, i, s, e, chw);
      if (flip)
        for (gsize r = 0; r < chw; r += w)
          for (int c = 0; c < w; c++)
            xi[r + c] = a * x0[r + w - 1 - c] + b * e[r + c];
      else
        for (gsize k = 0; k < chw; k++)
          xi[k] = a * x0[k] + b * e[k];

      if (t->uncond >= 0 && o->p_uncond > 0
          && u64_to_unit (df_rng_u64 (o->seed, key, s, POS_DROP)) < o->p_uncond)
        label = t->uncond;
      t->tsteps[i] = ts;
      t->labels[i] = label;
    }
}

/* The gradient of parameter i, or NULL when this pass gave it none. */
static const float *
param_grad (DfTrainer *t, int i)
{
  DfTensor *w = t->params[i].tensor;

  return w->grad != NULL && w->grad_valid ? w->grad : NULL;
}

/* What to do after a divergence: resume only if there is something to
 * resume from. */
static char *
diverged_hint (DfTrainer *t)
{
  if (t->checkpoint != NULL && t->saved_step >= 0)
    return g_strdup_printf ("resume from the checkpoint %s (step %d)",
                            t->checkpoint, t->saved_step);
  return g_strdup ("start again");
}

/* One step's AdamW constants (PyTorch's formulation), the EMA's and the
 * gradient's clipping scale. */
typedef struct {
  float b1, b2, eps, step_size, inv_sqrt_bc2;
  float keep;                 /* 1 - lr weight_decay, or 1 without decay */
  float ema_keep, grad_scale;
} AdamStep;

/* AdamW and the EMA for n weights w, moments m and v, EMA e; g NULL is a
 * zero gradient. */
DF_HOT static void
adam_update (const AdamStep *a, const float *restrict g, float *restrict w,
             float *restrict m, float *restrict v, float *restrict e,
             gsize n)
{
  for (gsize j = 0; j < n; j++)
    {
      float gj = g != NULL ? g[j] * a->grad_scale : 0.0f;

      m[j] = a->b1 * m[j] + (1.0f - a->b1) * gj;
      v[j] = a->b2 * v[j] + (1.0f - a->b2) * gj * gj;
      w[j] = w[j] * a->keep
             - a->step_size * m[j] / (sqrtf (v[j]) * a->inv_sqrt_bc2 + a->eps);
      e[j] = a->ema_keep * e[j] + (1.0f - a->ema_keep) * w[j];
    }
}

gboolean
df_trainer_step (DfTrainer *t, double *loss, GError **error)
{
  const DfTrainOptions *o;
  const DfDataset *d;
  DfTensor *x, *out;
  double value, norm2 = 0, scale = 1, lr, bc1, bc2, decay;
  float b1, b2, eps, step_size, inv_sqrt_bc2, keep, ema_keep;

  g_return_val_if_fail (t != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);
  o = &t->o;
  d = t->data;

  /* Batch: x_t [B,C,H,W] with its noise, timesteps and labels. */
  df_graph_reset (t->graph);
  x = df_graph_tensor_4d (t->graph, o->batch, d->c, d->h, d->w);
  make_batch (t, x->data);

  /* Forward, loss and backward into every parameter's grad. */
#pragma omp parallel for schedule(dynamic)
  for (int i = 0; i < t->n_params; i++)
    df_tensor_zero_grad (t->params[i].tensor);
  out = df_unet_forward (t->net, t->graph, x, t->tsteps,
                         t->conditional ? t->labels : NULL);
  value = t->classifier ? df_loss_cross_entropy (t->graph, out, t->labels)
                        : df_loss_mse (t->graph, out, t->eps);
  if (!isfinite (value))
    {
      char *how = diverged_hint (t);

      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "the loss is %s at step %d: training diverged; %s with a "
                   "lower learning rate or gradient clipping",
                   isnan (value) ? "not a number" : "infinite", t->step + 1,
                   how);
      g_free (how);
      return FALSE;
    }
  df_graph_backward (t->graph);

  /* Global L2 norm of the gradient, chunk sums combined in a fixed order. */
#pragma omp parallel for schedule(static)
  for (int k = 0; k < t->n_chunks; k++)
    {
      const Chunk *c = &t->chunks[k];
      const float *g = param_grad (t, c->param);
      double sq = 0;

      if (g != NULL)
        sq = df_sum_sq (g + c->begin, c->end - c->begin);
      t->chunk_sq[k] = sq;
    }
  for (int k = 0; k < t->n_chunks; k++)
    norm2 += t->chunk_sq[k];
  if (!isfinite (norm2))
    {
      char *how = diverged_hint (t);

      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "the gradient is not finite at step %d: training "
                   "diverged; %s with a lower learning rate", t->step + 1,
                   how);
      g_free (how);
      return FALSE;
    }
  if (o->grad_clip > 0 && sqrt (norm2) > o->grad_clip)
    scale = o->grad_clip / (sqrt (norm2) + 1e-6);

  /* AdamW (PyTorch's formulation) and the EMA, element by element. */
  lr = lr_at (o, t->step);
  bc1 = 1.0 - pow (o->beta1, t->step + 1);
  bc2 = 1.0 - pow (o->beta2, t->step + 1);
  decay = MIN (o->ema_decay, (1.0 + t->step) / (10.0 + t->step));
  b1 = o->beta1;
  b2 = o->beta2;
  eps = o->adam_eps;
  step_size = lr / bc1;
  inv_sqrt_bc2 = 1.0 / sqrt (bc2);
  keep = 1.0 - lr * o->weight_decay;
  ema_keep = decay;
#pragma omp parallel for schedule(static)
  for (int k = 0; k < t->n_chunks; k++)
    {
      const Chunk *c = &t->chunks[k];
      const float *g = param_grad (t, c->param);
      float *w = t->params[c->param].tensor->data;
      gsize off = t->offset[c->param];
      float *m = t->adam_m + off, *v = t->adam_v + off, *e = t->ema + off;
      AdamStep a = { b1, b2, eps, step_size, inv_sqrt_bc2,
                     t->decay[c->param] ? keep : 1.0f, ema_keep, scale };
      gsize j = c->begin;

      adam_update (&a, g != NULL ? g + j : NULL, w + j, m + j, v + j, e + j,
                   c->end - j);
    }

  t->step++;
  t->smoothed = t->have_smoothed
                ? SMOOTHING * t->smoothed + (1 - SMOOTHING) * value : value;
  t->have_smoothed = TRUE;
  if (loss != NULL)
    *loss = value;
  return TRUE;
}

/* ---- EMA ---- */

static void
copy_weights_out (DfTrainer *t, float *dst)
{
  for (int i = 0; i < t->n_params; i++)
    memcpy (dst + t->offset[i], t->params[i].tensor->data,
            t->params[i].tensor->size * sizeof (float));
}

static void
copy_weights_in (DfTrainer *t, const float *src)
{
  for (int i = 0; i < t->n_params; i++)
    memcpy (t->params[i].tensor->data, src + t->offset[i],
            t->params[i].tensor->size * sizeof (float));
}

void
df_trainer_apply_ema (DfTrainer *t)
{
  g_return_if_fail (t != NULL);
  copy_weights_in (t, t->ema);
}

/* ---- checkpoints ---- */

static char *
dtostr (double v)
{
  char buf[G_ASCII_DTOSTR_BUF_SIZE];

  return g_strdup (g_ascii_dtostr (buf, sizeof buf, v));
}

/* model.h's metadata (so df_model_load reads a checkpoint's weights), then
 * the training state and the options that shaped it. */
static char **
checkpoint_metadata (DfTrainer *t)
{
  GPtrArray *kv = g_ptr_array_new ();
  const DfTrainOptions *o = &t->o;
  char **model_meta = df_model_metadata (t->model);

#define KV(k, v) G_STMT_START { g_ptr_array_add (kv, g_strdup (k)); \
                                g_ptr_array_add (kv, (v)); } G_STMT_END

  for (char **p = model_meta; *p != NULL; p++)
    g_ptr_array_add (kv, g_strdup (*p));
  g_strfreev (model_meta);

  KV ("train.step", g_strdup_printf ("%d", t->step));
  KV ("train.smoothed_loss", dtostr (t->have_smoothed ? t->smoothed : NAN));
  KV ("train.rng", g_strdup ("philox4x32-10 keyed by (seed, sample, step): "
                             "no state beyond train.step"));
  KV ("train.task", g_strdup (t->classifier ? "classifier" : "diffusion"));
  KV ("train.seed", g_strdup_printf ("%" G_GUINT64_FORMAT, o->seed));
  KV ("train.steps", g_strdup_printf ("%d", o->steps));
  KV ("train.batch", g_strdup_printf ("%d", o->batch));
  KV ("train.lr", dtostr (o->lr));
  KV ("train.warmup", g_strdup_printf ("%d", o->warmup));
  KV ("train.lr_schedule", g_strdup (o->lr_schedule == DF_LR_COSINE
                                     ? "cosine" : "constant"));
  KV ("train.weight_decay", dtostr (o->weight_decay));
  KV ("train.beta1", dtostr (o->beta1));
  KV ("train.beta2", dtostr (o->beta2));
  KV ("train.adam_eps", dtostr (o->adam_eps));
  KV ("train.ema_decay", dtostr (o->ema_decay));
  KV ("train.grad_clip", dtostr (o->grad_clip));
  KV ("train.p_uncond", dtostr (t->uncond >= 0 ? o->p_uncond : 0.0));
  KV ("train.hflip", g_strdup (o->hflip ? "true" : "false"));
  KV ("train.images", g_strdup_printf ("%d", t->data->n));
  KV ("train.checkpoint_minutes", dtostr (o->checkpoint_minutes));
  KV ("train.threads", g_strdup_printf ("%d", df_get_threads ()));
#undef KV

  g_ptr_array_add (kv, NULL);
  return (char **) g_ptr_array_free (kv, FALSE);
}

static const char *const prefixes[4] = { "", "ema.", "adam_m.", "adam_v." };

static gboolean
write_checkpoint (DfTrainer *t, GError **error)
{
  int n = 4 * t->n_params;
  DfSafetensorsEntry *entries = g_new0 (DfSafetensorsEntry, n);
  char **names = g_new0 (char *, n + 1);
  char **meta = checkpoint_metadata (t);
  const float *state[4] = { NULL, t->ema, t->adam_m, t->adam_v };
  GError *err = NULL;
  gboolean ok;

  for (int k = 0; k < 4; k++)
    for (int i = 0; i < t->n_params; i++)
      {
        DfSafetensorsEntry *e = &entries[k * t->n_params + i];
        DfTensor *w = t->params[i].tensor;

        names[k * t->n_params + i] = g_strconcat (prefixes[k],
                                                  t->params[i].name, NULL);
        e->name = names[k * t->n_params + i];
        e->ndim = w->ndim;
        for (int j = 0; j < w->ndim; j++)
          e->shape[j] = w->shape[j];
        e->data = k == 0 ? w->data : state[k] + t->offset[i];
      }
  ok = df_safetensors_write (t->checkpoint, (const char *const *) meta,
                             entries, n, &err);
  if (!ok)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT,
                   "cannot write the checkpoint %s at step %d: %s (the "
                   "previous checkpoint, if any, is intact)", t->checkpoint,
                   t->step, err->message);
      g_error_free (err);
    }
  else
    t->saved_step = t->step;
  g_strfreev (names);
  g_strfreev (meta);
  g_free (entries);
  return ok;
}

/* The EMA weights into o->output, the live weights kept aside meanwhile. */
static gboolean
write_output (DfTrainer *t, GError **error)
{
  gboolean ok;

  if (t->live == NULL)
    t->live = g_new (float, t->n_weights);
  copy_weights_out (t, t->live);
  copy_weights_in (t, t->ema);
  ok = df_model_save (t->model, t->output, error);
  copy_weights_in (t, t->live);
  if (!ok)
    g_prefix_error (error, "cannot write the trained model at step %d: ",
                    t->step);
  return ok;
}

gboolean
df_trainer_save_checkpoint (DfTrainer *t, GError **error)
{
  g_return_val_if_fail (t != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (t->checkpoint != NULL && !write_checkpoint (t, error))
    return FALSE;
  if (t->output != NULL && !write_output (t, error))
    return FALSE;
  g_debug ("saved step %d to %s%s%s", t->step,
           t->checkpoint ? t->checkpoint : "", t->output ? " and " : "",
           t->output ? t->output : "");
  return TRUE;
}

/* Drop the log's rows after the resumed step: they will be run again. */
static gboolean
truncate_log (const char *path, int step, GError **error)
{
  char *text = NULL, **lines;
  GString *keep;
  GError *err = NULL;
  gboolean ok = TRUE;

  if (!g_file_get_contents (path, &text, NULL, &err))
    {
      gboolean missing = g_error_matches (err, G_FILE_ERROR,
                                          G_FILE_ERROR_NOENT);
      if (!missing)
        g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT,
                     "cannot read the log %s: %s", path, err->message);
      g_error_free (err);
      return missing;
    }
  lines = g_strsplit (text, "\n", -1);
  keep = g_string_new (NULL);
  for (int i = 0; lines[i] != NULL; i++)
    {
      char *end;
      gint64 s = g_ascii_strtoll (lines[i], &end, 10);

      if (lines[i][0] == '\0' || (end != lines[i] && s > step))
        continue;
      g_string_append (keep, lines[i]);
      g_string_append_c (keep, '\n');
    }
  if (!g_file_set_contents (path, keep->str, keep->len, &err))
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT,
                   "cannot rewrite the log %s: %s", path, err->message);
      g_error_free (err);
      ok = FALSE;
    }
  g_string_free (keep, TRUE);
  g_strfreev (lines);
  g_free (text);
  return ok;
}

/* ---- resuming the same run ---- */

static gboolean
same_double (double a, double b)
{
  return a == b || fabs (a - b) <= 1e-12 * MAX (fabs (a), fabs (b));
}

/* An option that defines the run differs: what ("--seed is") with this
 * run's value and the checkpoint's. */
static gboolean
refuse (DfTrainer *t, GError **error, const char *what, const char *now,
        const char *was)
{
  g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT,
               "cannot resume from %s: %s %s, the checkpoint ran %s (a "
               "resumed run keeps what defines it: give the checkpoint's "
               "value, or start a new --checkpoint)", t->checkpoint, what,
               now, was);
  return FALSE;
}

/* A JSON value as the CLI takes it: "32,64,128"; block types (flags) as
 * --attention's 0 and 1. */
static char *
json_show (JsonNode *n, gboolean flags)
{
  switch (JSON_NODE_TYPE (n))
    {
    case JSON_NODE_NULL:
      return g_strdup ("null");
    case JSON_NODE_VALUE:
      switch (json_node_get_value_type (n))
        {
        case G_TYPE_STRING:
          if (flags)
            return g_strdup (strstr (json_node_get_string (n), "Attn")
                             ? "1" : "0");
          return g_strdup (json_node_get_string (n));
        case G_TYPE_BOOLEAN:
          return g_strdup (json_node_get_boolean (n) ? "true" : "false");
        case G_TYPE_INT64:
          return g_strdup_printf ("%" G_GINT64_FORMAT, json_node_get_int (n));
        default:
          return g_strdup_printf ("%g", json_node_get_double (n));
        }
    case JSON_NODE_ARRAY:
      {
        JsonArray *a = json_node_get_array (n);
        GString *s = g_string_new (NULL);

        for (guint i = 0; i < json_array_get_length (a); i++)
          {
            char *e = json_show (json_array_get_element (a, i), flags);

            g_string_append_printf (s, "%s%s", i ? "," : "", e);
            g_free (e);
          }
        return g_string_free (s, FALSE);
      }
    case JSON_NODE_OBJECT:
      return json_to_string (n, FALSE);
    }
  return g_strdup ("?");
}

/* The options behind the config's and the schedule's keys. */
static const char *const key_options[][2] = {
  { "sample_size", "--size" },
  { "in_channels", "--image-channels" },
  { "out_channels", "--image-channels" },
  { "block_out_channels", "--channels" },
  { "layers_per_block", "--layers" },
  { "norm_num_groups", "--groups" },
  { "attention_head_dim", "--head-dim" },
  { "down_block_types", "--attention" },
  { "up_block_types", "--attention" },
  { "beta_schedule", "--beta-schedule" },
  { "num_train_timesteps", "--timesteps" },
};

/* Every key of the checkpoint's JSON object was (metadata item item) that
 * this run's object now has too must have the same value. */
static gboolean
same_object (DfTrainer *t, const char *item, const char *was_text,
             const char *now_text, GError **error)
{
  JsonNode *was = json_from_string (was_text, NULL);
  JsonNode *now = json_from_string (now_text, NULL);
  gboolean ok = TRUE;

  /* A checkpoint this trainer wrote has both; a file it cannot read is
   * not a reason to refuse what the tensors' shapes allow. */
  if (was != NULL && now != NULL && JSON_NODE_HOLDS_OBJECT (was)
      && JSON_NODE_HOLDS_OBJECT (now))
    {
      JsonObject *wo = json_node_get_object (was);
      JsonObject *no = json_node_get_object (now);
      GList *keys = json_object_get_members (wo);

      for (GList *k = keys; k != NULL && ok; k = k->next)
        {
          const char *key = k->data, *option = NULL;
          JsonNode *a = json_object_get_member (wo, key);
          JsonNode *b = json_object_get_member (no, key);
          gboolean flags = g_str_has_suffix (key, "_block_types");
          char *what, *va, *vb;

          /* json_node_equal compares numbers by value: 1 == 1.0. */
          if (b == NULL || json_node_equal (a, b))
            continue;
          for (gsize i = 0; i < G_N_ELEMENTS (key_options); i++)
            if (strcmp (key, key_options[i][0]) == 0)
              option = key_options[i][1];
          what = option != NULL ? g_strdup_printf ("%s is", option)
                                : g_strdup_printf ("the %s's %s is", item,
                                                   key);
          va = json_show (a, flags);
          vb = json_show (b, flags);
          ok = refuse (t, error, what, vb, va);
          g_free (what);
          g_free (va);
          g_free (vb);
        }
      g_list_free (keys);
    }
  if (was != NULL)
    json_node_unref (was);
  if (now != NULL)
    json_node_unref (now);
  return ok;
}

/* Names that are only their indices ("0", "1", ...): an IDX folder whose
 * path does not say Fashion-MNIST. */
static gboolean
index_names (JsonArray *a)
{
  for (guint i = 0; i < json_array_get_length (a); i++)
    {
      const char *s = json_array_get_string_element (a, i);
      char num[16];

      g_snprintf (num, sizeof num, "%u", i);
      if (s == NULL || strcmp (s, num) != 0)
        return FALSE;
    }
  return TRUE;
}

/* The same classes: as many, and the same names where both sides have
 * names. */
static gboolean
same_classes (DfTrainer *t, const char *was_text, const char *now_text,
              GError **error)
{
  JsonNode *was = json_from_string (was_text, NULL);
  JsonNode *now = json_from_string (now_text, NULL);
  gboolean ok = TRUE;

  if (was != NULL && now != NULL && JSON_NODE_HOLDS_ARRAY (was)
      && JSON_NODE_HOLDS_ARRAY (now))
    {
      JsonArray *wa = json_node_get_array (was);
      JsonArray *na = json_node_get_array (now);
      guint nw = json_array_get_length (wa), nn = json_array_get_length (na);

      if (nw != nn)
        {
          char *a = g_strdup_printf ("%u classes", nn);
          char *b = g_strdup_printf ("%u", nw);

          ok = refuse (t, error, "--data has", a, b);
          g_free (a);
          g_free (b);
        }
      else if (!index_names (wa) && !index_names (na))
        for (guint i = 0; i < nw && ok; i++)
          {
            const char *a = json_array_get_string_element (wa, i);
            const char *b = json_array_get_string_element (na, i);

            if (g_strcmp0 (a, b) != 0)
              {
                char *what = g_strdup_printf ("--data's class %u is", i);
                char *qa = g_strdup_printf ("\"%s\"", a ? a : "");
                char *qb = g_strdup_printf ("\"%s\"", b ? b : "");

                ok = refuse (t, error, what, qb, qa);
                g_free (what);
                g_free (qa);
                g_free (qb);
              }
          }
    }
  if (was != NULL)
    json_node_unref (was);
  if (now != NULL)
    json_node_unref (now);
  return ok;
}

static const char *
model_item (char **meta, const char *key)
{
  for (char **p = meta; p[0] != NULL && p[1] != NULL; p += 2)
    if (strcmp (p[0], key) == 0)
      return p[1];
  return NULL;
}

/* Everything that defines the run, from the checkpoint's metadata: the
 * data, the network (sample_size changes no tensor's shape), the schedule,
 * the seed, the batch, the flips, p_uncond.  Items the checkpoint lacks
 * are not checked. */
static gboolean
check_same_run (DfTrainer *t, DfSafetensors *st, GError **error)
{
  const DfTrainOptions *o = &t->o;
  char **meta = df_model_metadata (t->model);
  char now[G_ASCII_DTOSTR_BUF_SIZE + 16];
  const char *v;
  gboolean ok = TRUE;

#define GET(key) (v = df_safetensors_get_metadata (st, key))

  if (ok && GET ("train.images")
      && g_ascii_strtoll (v, NULL, 10) != t->data->n)
    {
      g_snprintf (now, sizeof now, "%d images", t->data->n);
      ok = refuse (t, error, "--data has", now, v);
    }
  if (ok && GET ("class_names"))
    ok = same_classes (t, v, model_item (meta, "class_names"), error);
  if (ok && GET ("config"))
    ok = same_object (t, "config", v, model_item (meta, "config"), error);
  if (ok && GET ("schedule"))
    ok = same_object (t, "schedule", v, model_item (meta, "schedule"), error);
  if (ok && GET ("train.seed") && g_ascii_strtoull (v, NULL, 10) != o->seed)
    {
      g_snprintf (now, sizeof now, "%" G_GUINT64_FORMAT, o->seed);
      ok = refuse (t, error, "--seed is", now, v);
    }
  if (ok && GET ("train.batch") && g_ascii_strtoll (v, NULL, 10) != o->batch)
    {
      g_snprintf (now, sizeof now, "%d", o->batch);
      ok = refuse (t, error, "--batch is", now, v);
    }
  if (ok && GET ("train.hflip")
      && (strcmp (v, "true") == 0) != (o->hflip != FALSE))
    ok = refuse (t, error, "--hflip is", o->hflip ? "on" : "off",
                 strcmp (v, "true") == 0 ? "on" : "off");
  if (ok && GET ("train.p_uncond"))
    {
      /* What the run does: a model without an uncond class drops none. */
      double was = g_ascii_strtod (v, NULL);
      double p = t->uncond >= 0 ? o->p_uncond : 0.0;

      if (!same_double (was, p))
        {
          char a[32];

          g_snprintf (now, sizeof now, "%g", p);
          g_snprintf (a, sizeof a, "%g", was);
          ok = refuse (t, error, "--p-uncond is", now, a);
        }
    }
#undef GET

  g_strfreev (meta);
  return ok;
}

static void
add_change (DfTrainer *t, const char *option, char *was, char *now)
{
  DfTrainChange c = { option, was, now };

  g_array_append_val (t->changes, c);
}

/* The checkpoint's value of a number this run may change. */
static void
note_double (DfTrainer *t, DfSafetensors *st, const char *key,
             const char *option, double now)
{
  const char *v = df_safetensors_get_metadata (st, key);
  double was;

  if (v == NULL)
    return;
  was = g_ascii_strtod (v, NULL);
  if (!same_double (was, now))
    add_change (t, option, g_strdup_printf ("%g", was),
                g_strdup_printf ("%g", now));
}

static void
note_int (DfTrainer *t, DfSafetensors *st, const char *key,
          const char *option, int now)
{
  const char *v = df_safetensors_get_metadata (st, key);

  if (v != NULL && g_ascii_strtoll (v, NULL, 10) != now)
    add_change (t, option, g_strdup_printf ("%d",
                                            (int) g_ascii_strtoll (v, NULL,
                                                                   10)),
                g_strdup_printf ("%d", now));
}

/* What a run may change on resume, for the caller to show. */
static void
note_changes (DfTrainer *t, DfSafetensors *st)
{
  const DfTrainOptions *o = &t->o;
  const char *sched = o->lr_schedule == DF_LR_COSINE ? "cosine" : "constant";
  const char *v;

  clear_changes (t);
  note_int (t, st, "train.steps", "--steps", o->steps);
  note_double (t, st, "train.lr", "--lr", o->lr);
  v = df_safetensors_get_metadata (st, "train.lr_schedule");
  if (v != NULL && strcmp (v, sched) != 0)
    add_change (t, "--lr-schedule", g_strdup (v), g_strdup (sched));
  note_int (t, st, "train.warmup", "--warmup", o->warmup);
  note_double (t, st, "train.weight_decay", "--weight-decay",
               o->weight_decay);
  note_double (t, st, "train.beta1", "Adam's beta1", o->beta1);
  note_double (t, st, "train.beta2", "Adam's beta2", o->beta2);
  note_double (t, st, "train.adam_eps", "Adam's epsilon", o->adam_eps);
  note_double (t, st, "train.ema_decay", "--ema", o->ema_decay);
  note_double (t, st, "train.grad_clip", "--grad-clip", o->grad_clip);
  note_double (t, st, "train.checkpoint_minutes", "--checkpoint-minutes",
               o->checkpoint_minutes);
  note_int (t, st, "train.threads", "--threads", df_get_threads ());
}

const DfTrainChange *
df_trainer_changes (DfTrainer *t, int *n_changes)
{
  g_return_val_if_fail (t != NULL, NULL);

  if (n_changes != NULL)
    *n_changes = t->changes->len;
  return (const DfTrainChange *) t->changes->data;
}

gboolean
df_trainer_resume (DfTrainer *t, gboolean *resumed, GError **error)
{
  DfSafetensors *st;
  const char *v, *kind;
  GError *err = NULL;
  gint64 step;
  char *end;
  float *state[4];

  g_return_val_if_fail (t != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (resumed != NULL)
    *resumed = FALSE;
  if (!t->o.resume || t->checkpoint == NULL
      || !g_file_test (t->checkpoint, G_FILE_TEST_EXISTS))
    return TRUE;

  /* A checkpoint of this trainer: the step, and the same kind of model. */
  st = df_safetensors_open (t->checkpoint, &err);
  if (st == NULL)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT,
                   "cannot resume from %s: %s", t->checkpoint, err->message);
      g_error_free (err);
      return FALSE;
    }
  v = df_safetensors_get_metadata (st, "train.step");
  step = v != NULL ? g_ascii_strtoll (v, &end, 10) : -1;
  if (v == NULL || *end != '\0' || step < 0 || step > G_MAXINT32)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT,
                   "cannot resume from %s: it is not a training checkpoint "
                   "(no valid train.step); give the file written by "
                   "--checkpoint, or start without --resume", t->checkpoint);
      df_safetensors_free (st);
      return FALSE;
    }
  kind = df_safetensors_get_metadata (st, "kind");
  if (kind != NULL
      && strcmp (kind, t->classifier ? "classifier" : "unet") != 0)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT,
                   "cannot resume from %s: it holds a %s, this run trains "
                   "a %s", t->checkpoint, kind,
                   t->classifier ? "classifier" : "unet");
      df_safetensors_free (st);
      return FALSE;
    }
  if (!check_same_run (t, st, error))
    {
      df_safetensors_free (st);
      return FALSE;
    }

  /* Weights, EMA and Adam's moments, each checked against the model. */
  state[1] = t->ema;
  state[2] = t->adam_m;
  state[3] = t->adam_v;
  for (int k = 0; k < 4; k++)
    for (int i = 0; i < t->n_params; i++)
      {
        DfTensor *w = t->params[i].tensor;
        char *name = g_strconcat (prefixes[k], t->params[i].name, NULL);
        gint64 shape[8];
        gboolean ok;

        for (int j = 0; j < w->ndim; j++)
          shape[j] = w->shape[j];
        ok = df_safetensors_read_f32 (st, name, w->ndim, shape,
                                      k == 0 ? w->data
                                             : state[k] + t->offset[i],
                                      &err);
        g_free (name);
        if (!ok)
          {
            g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT,
                         "cannot resume from %s: %s (the checkpoint is of "
                         "another model configuration; start without "
                         "--resume or use its configuration)", t->checkpoint,
                         err->message);
            g_error_free (err);
            df_safetensors_free (st);
            return FALSE;
          }
      }
  t->step = step;
  t->saved_step = step;
  v = df_safetensors_get_metadata (st, "train.smoothed_loss");
  t->smoothed = v != NULL ? g_ascii_strtod (v, NULL) : NAN;
  t->have_smoothed = isfinite (t->smoothed);
  note_changes (t, st);
  df_safetensors_free (st);
  g_debug ("resumed from %s at step %d", t->checkpoint, t->step);
  if (resumed != NULL)
    *resumed = TRUE;
  return TRUE;
}

/* ---- the loop ---- */

static FILE *
open_log (const char *path, GError **error)
{
  FILE *f = fopen (path, "a");

  if (f == NULL)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "cannot open the log %s: %s", path, g_strerror (errno));
      return NULL;
    }
  if (ftell (f) == 0)
    fputs ("step,loss,smoothed_loss,lr,img_per_s\n", f);
  return f;
}

static void
log_row (FILE *f, const DfTrainProgress *p)
{
  char a[G_ASCII_DTOSTR_BUF_SIZE], b[G_ASCII_DTOSTR_BUF_SIZE];
  char c[G_ASCII_DTOSTR_BUF_SIZE], d[G_ASCII_DTOSTR_BUF_SIZE];

  fprintf (f, "%d,%s,%s,%s,%s\n", p->step,
           g_ascii_formatd (a, sizeof a, "%.6g", p->loss),
           g_ascii_formatd (b, sizeof b, "%.6g", p->smoothed_loss),
           g_ascii_formatd (c, sizeof c, "%.6g", p->lr),
           g_ascii_formatd (d, sizeof d, "%.2f", p->img_per_s));
  fflush (f);
}

gboolean
df_trainer_run (DfTrainer *t, DfTrainProgressFunc progress, gpointer data,
                GCancellable *cancellable, GError **error)
{
  FILE *log = NULL;
  gint64 start, last_save;
  int first;
  gboolean ok = TRUE;

  g_return_val_if_fail (t != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  /* The log holds this training's history: rows after the current step
   * (all of them for a fresh start) belong to a run that is being redone. */
  if (t->log_csv != NULL
      && (!truncate_log (t->log_csv, t->step, error)
          || (log = open_log (t->log_csv, error)) == NULL))
    return FALSE;
  start = last_save = g_get_monotonic_time ();
  first = t->step;

  while (t->step < t->o.steps)
    {
      DfTrainProgress p;
      double loss, elapsed;
      gint64 now;

      /* Cancel: keep the work done so far, then say so. */
      if (g_cancellable_is_cancelled (cancellable))
        {
          if ((t->checkpoint != NULL || t->output != NULL)
              && !df_trainer_save_checkpoint (t, error))
            ok = FALSE;
          else
            g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CANCELLED,
                         "training cancelled after step %d%s%s", t->step,
                         t->checkpoint ? "; resume from " : "",
                         t->checkpoint ? t->checkpoint : "");
          ok = FALSE;
          break;
        }

      p.lr = lr_at (&t->o, t->step);
      if (!df_trainer_step (t, &loss, error))
        {
          ok = FALSE;
          break;
        }

      /* Progress and log. */
      now = g_get_monotonic_time ();
      elapsed = (now - start) / 1e6;
      p.step = t->step;
      p.steps = t->o.steps;
      p.loss = loss;
      p.smoothed_loss = t->smoothed;
      p.img_per_s = (t->step - first) * (double) t->o.batch
                    / MAX (elapsed, 1e-9);
      p.eta_seconds = (t->o.steps - t->step) * elapsed / (t->step - first);
      if (log != NULL)
        log_row (log, &p);
      if (progress != NULL)
        progress (data, &p);

      /* Periodic checkpoint. */
      if (t->o.checkpoint_minutes > 0 && t->step < t->o.steps
          && now - last_save >= t->o.checkpoint_minutes * 60e6)
        {
          if (!df_trainer_save_checkpoint (t, error))
            {
              ok = FALSE;
              break;
            }
          last_save = g_get_monotonic_time ();
        }
    }

  /* The end: last checkpoint and output, then the model holds the EMA. */
  if (ok)
    {
      ok = df_trainer_save_checkpoint (t, error);
      if (ok)
        df_trainer_apply_ema (t);
    }
  if (log != NULL)
    fclose (log);
  return ok;
}

/* ---- memory ---- */

/* Parameters of a convolution, a linear layer, a GroupNorm. */
static double
conv_p (int ci, int co, int k)
{
  return (double) co * ci * k * k + co;
}

static double
linear_p (int in, int out)
{
  return (double) out * in + out;
}

static double
resnet_p (int cin, int cout, int e)
{
  double p = 2.0 * cin + conv_p (cin, cout, 3) + linear_p (e, cout)
             + 2.0 * cout + conv_p (cout, cout, 3);

  return cin != cout ? p + conv_p (cin, cout, 1) : p;
}

static double
attn_p (int c)
{
  return 2.0 * c + 4 * linear_p (c, c);
}

/* Floats of the outputs a resnet records for one sample at hw pixels:
 * silu (norm1) (cin), conv1 + temb, silu (norm2), the shortcut, conv2 +
 * the shortcut and its rescale (cout); attention: norm, tokens, q, k, v, the
 * attention, to_out, the image, the sum and its rescale. */
static double
resnet_f (int cin, int cout, double hw)
{
  return hw * (cin + 5.0 * cout);
}

static double
attn_f (int c, double hw)
{
  return hw * 10.0 * c;
}

/* Floats of a convolution's scratch at batch b (ops.c knows its forms). */
static double
conv_ws (int ci, int co, int k, int s, double b)
{
  return df_conv2d_scratch ((int) b, ci, co, k, s, omp_get_max_threads ());
}

double
df_train_memory_estimate (const DfUNetConfig *cfg, gboolean classifier,
                          int batch, double *n_params)
{
  const int *boc;
  int nb, L, e, s, out_ch;
  double p, f, ws, b = MAX (batch, 1), hw, bytes;

  g_return_val_if_fail (cfg != NULL, 0);
  g_return_val_if_fail (cfg->n_blocks >= 1 && cfg->n_blocks <= DF_MAX_BLOCKS,
                        0);

  /* The walk of df_unet_new and df_unet_forward: p parameters, f floats
   * of recorded outputs per sample, ws the largest scratch. */
  boc = cfg->block_out_channels;
  nb = cfg->n_blocks;
  L = cfg->layers_per_block;
  e = 4 * boc[0];
  s = MAX (cfg->sample_size, 1);
  hw = (double) s * s;

  /* Stem, time and class embeddings. */
  p = conv_p (cfg->in_channels, boc[0], 3) + linear_p (boc[0], e)
      + linear_p (e, e) + MAX (cfg->num_class_embeds, 0) * (double) e;
  f = hw * (cfg->in_channels + boc[0]) + 8.0 * e;
  ws = conv_ws (cfg->in_channels, boc[0], 3, s, b);

  /* Down blocks. */
  out_ch = boc[0];
  for (int i = 0; i < nb; i++)
    {
      int in_ch = out_ch;

      out_ch = boc[i];
      for (int j = 0; j < L; j++)
        {
          int cin = j == 0 ? in_ch : out_ch;

          p += resnet_p (cin, out_ch, e);
          f += resnet_f (cin, out_ch, hw);
          ws = MAX (ws, conv_ws (cin, out_ch, 3, s, b));
          ws = MAX (ws, conv_ws (out_ch, out_ch, 3, s, b));
          if (cfg->down_attention[i])
            {
              p += attn_p (out_ch);
              f += attn_f (out_ch, hw);
            }
        }
      if (i != nb - 1)
        {
          p += conv_p (out_ch, out_ch, 3);
          ws = MAX (ws, conv_ws (out_ch, out_ch, 3, s, b));
          s /= 2;
          hw = (double) s * s;
          f += hw * out_ch;
        }
    }

  /* Mid block. */
  p += 2 * resnet_p (out_ch, out_ch, e);
  f += 2 * resnet_f (out_ch, out_ch, hw);
  ws = MAX (ws, conv_ws (out_ch, out_ch, 3, s, b));
  if (cfg->mid_attention)
    {
      p += attn_p (out_ch);
      f += attn_f (out_ch, hw);
    }

  if (classifier)
    {
      p += 2.0 * out_ch + linear_p (out_ch, MAX (cfg->classifier_classes, 1));
      f += hw * out_ch + out_ch;
    }
  else
    {
      /* Up blocks on the concatenated skips, then the output. */
      for (int i = 0; i < nb; i++)
        {
          int prev = out_ch, in_ch = boc[MAX (nb - 2 - i, 0)];

          out_ch = boc[nb - 1 - i];
          for (int j = 0; j < L + 1; j++)
            {
              int skip = j == L ? in_ch : out_ch;
              int cin = (j == 0 ? prev : out_ch) + skip;

              f += hw * cin;
              p += resnet_p (cin, out_ch, e);
              f += resnet_f (cin, out_ch, hw);
              ws = MAX (ws, conv_ws (cin, out_ch, 3, s, b));
              ws = MAX (ws, conv_ws (out_ch, out_ch, 3, s, b));
              if (cfg->up_attention[i])
                {
                  p += attn_p (out_ch);
                  f += attn_f (out_ch, hw);
                }
            }
          if (i != nb - 1)
            {
              p += conv_p (out_ch, out_ch, 3);
              s *= 2;
              hw = (double) s * s;
              f += 2 * hw * out_ch;
              ws = MAX (ws, conv_ws (out_ch, out_ch, 3, s, b));
            }
        }
      p += 2.0 * boc[0] + conv_p (boc[0], cfg->out_channels, 3);
      f += hw * (boc[0] + cfg->out_channels);
      ws = MAX (ws, conv_ws (boc[0], cfg->out_channels, 3, s, b));
    }

  /* Floats: 6 a parameter (weights, grads, Adam's two moments, EMA, the
   * copy kept while the EMA is saved), every recorded output and its
   * gradient, the scratch, the batch and its noise; a quarter more for
   * what this leaves out (allocator slack, saved statistics, per-thread
   * tiles), and 64 MiB for the program. */
  hw = (double) MAX (cfg->sample_size, 1) * MAX (cfg->sample_size, 1);
  bytes = 4.0 * (6 * p + 2 * b * f + ws + 3 * b * cfg->in_channels * hw);
  if (n_params != NULL)
    *n_params = p;
  return 1.25 * bytes + 64.0 * 1024 * 1024;
}

/* ---- the loss plot ---- */

/* 1, 2 or 5 times a power of ten, near range / n. */
static double
nice_step (double range, int n)
{
  double raw = range / n, p = pow (10, floor (log10 (raw))), f = raw / p;

  return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}


/* Tick k of a decade's level: 1, 2, 5; 1..9; 1, 1.5, ..., 9.5. */
static double
tick_value (int level, int k)
{
  static const double coarse[3] = { 1, 2, 5 };

  return level == 0 ? coarse[k] : level == 1 ? k + 1 : 1 + 0.5 * k;
}

gboolean
df_train_plot_loss (const char *csv, const char *png, GError **error)
{
  const int W = 900, H = 540, L = 90, R = 30, T = 50, B = 70;
  char *text = NULL, **lines;
  GArray *xs, *raw, *sm;
  GError *err = NULL;
  cairo_surface_t *surf;
  cairo_t *cr;
  cairo_status_t status;
  double xmax = 0, ymin = G_MAXDOUBLE, ymax = 0, lo, hi, xstep;
  static const int per_level[3] = { 3, 9, 18 };
  int n_ticks = 0, level;
  gboolean ok = TRUE;

  g_return_val_if_fail (csv != NULL && png != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  /* Rows step,loss,smoothed_loss,...; the header and bad rows skipped. */
  if (!g_file_get_contents (csv, &text, NULL, &err))
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "cannot read the loss log %s: %s", csv, err->message);
      g_error_free (err);
      return FALSE;
    }
  xs = g_array_new (FALSE, FALSE, sizeof (double));
  raw = g_array_new (FALSE, FALSE, sizeof (double));
  sm = g_array_new (FALSE, FALSE, sizeof (double));
  lines = g_strsplit (text, "\n", -1);
  for (int i = 0; lines[i] != NULL; i++)
    {
      char **f = g_strsplit (lines[i], ",", -1);

      if (g_strv_length (f) >= 3)
        {
          char *e0, *e1, *e2;
          double s = g_ascii_strtod (f[0], &e0);
          double l = g_ascii_strtod (f[1], &e1);
          double m = g_ascii_strtod (f[2], &e2);

          if (e0 != f[0] && e1 != f[1] && e2 != f[2] && isfinite (m) && m > 0)
            {
              g_array_append_val (xs, s);
              g_array_append_val (raw, l);
              g_array_append_val (sm, m);
              xmax = MAX (xmax, s);
              ymin = MIN (ymin, m);
              ymax = MAX (ymax, m);
            }
        }
      g_strfreev (f);
    }
  g_strfreev (lines);
  g_free (text);
  if (xs->len == 0)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "%s: no loss values to plot (expected rows of "
                   "step,loss,smoothed_loss,...)", csv);
      ok = FALSE;
      goto out;
    }

  /* Axes: x linear from 0, y log10 padded a little. */
  xmax = MAX (xmax, 1);
  lo = log10 (ymin) - 0.05;
  hi = log10 (ymax) + 0.05;
  if (hi - lo < 0.3)
    {
      double mid = (hi + lo) / 2;
      lo = mid - 0.15;
      hi = mid + 0.15;
    }
  xstep = nice_step (xmax, 6);

#define PX(s) (L + (s) / xmax * (W - L - R))
#define PY(v) (T + (hi - log10 (v)) / (hi - lo) * (H - T - B))

  surf = cairo_image_surface_create (CAIRO_FORMAT_RGB24, W, H);
  cr = cairo_create (surf);
  cairo_set_source_rgb (cr, 1, 1, 1);
  cairo_paint (cr);
  cairo_select_font_face (cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL,
                          CAIRO_FONT_WEIGHT_NORMAL);
  cairo_set_font_size (cr, 13);
  cairo_set_line_width (cr, 1);

  /* Grid and tick labels: 1, 2, 5 per decade on y, or every digit, or
   * every half digit, whichever first puts two in the range; nice steps
   * on x. */
  for (level = 0; level < 2; level++)
    {
      n_ticks = 0;
      for (int dec = (int) floor (lo); dec <= (int) ceil (hi); dec++)
        for (int k = 0; k < per_level[level]; k++)
          {
            double v = log10 (tick_value (level, k) * pow (10, dec));
            n_ticks += v >= lo && v <= hi;
          }
      if (n_ticks >= 2)
        break;
    }
  for (int dec = (int) floor (lo); dec <= (int) ceil (hi); dec++)
    for (int k = 0; k < per_level[level]; k++)
      {
        double v = tick_value (level, k) * pow (10, dec);
        char label[32];
        cairo_text_extents_t ext;

        if (log10 (v) < lo || log10 (v) > hi)
          continue;
        cairo_set_source_rgb (cr, k == 0 ? 0.75 : 0.88, k == 0 ? 0.75 : 0.88,
                              k == 0 ? 0.75 : 0.88);
        cairo_move_to (cr, L, floor (PY (v)) + 0.5);
        cairo_line_to (cr, W - R, floor (PY (v)) + 0.5);
        cairo_stroke (cr);
        g_snprintf (label, sizeof label, "%g", v);
        cairo_text_extents (cr, label, &ext);
        cairo_set_source_rgb (cr, 0, 0, 0);
        cairo_move_to (cr, L - 6 - ext.width, PY (v) + ext.height / 2);
        cairo_show_text (cr, label);
      }
  for (double s = 0; s <= xmax + 1e-9; s += xstep)
    {
      char label[32];
      cairo_text_extents_t ext;

      cairo_set_source_rgb (cr, 0.88, 0.88, 0.88);
      cairo_move_to (cr, floor (PX (s)) + 0.5, T);
      cairo_line_to (cr, floor (PX (s)) + 0.5, H - B);
      cairo_stroke (cr);
      g_snprintf (label, sizeof label, "%g", s);
      cairo_text_extents (cr, label, &ext);
      cairo_set_source_rgb (cr, 0, 0, 0);
      cairo_move_to (cr, PX (s) - ext.width / 2, H - B + 8 + ext.height);
      cairo_show_text (cr, label);
    }
  cairo_set_source_rgb (cr, 0, 0, 0);
  cairo_rectangle (cr, L + 0.5, T + 0.5, W - L - R - 1, H - T - B - 1);
  cairo_stroke (cr);

  /* The curves, clipped to the plot: raw loss faint, smoothed on top. */
  cairo_save (cr);
  cairo_rectangle (cr, L, T, W - L - R, H - T - B);
  cairo_clip (cr);
  for (int pass = 0; pass < 2; pass++)
    {
      GArray *ys = pass == 0 ? raw : sm;
      gboolean pen = FALSE;

      for (guint i = 0; i < xs->len; i++)
        {
          double y = g_array_index (ys, double, i);

          if (!(y > 0) || !isfinite (y))
            {
              pen = FALSE;
              continue;
            }
          if (pen)
            cairo_line_to (cr, PX (g_array_index (xs, double, i)), PY (y));
          else
            cairo_move_to (cr, PX (g_array_index (xs, double, i)), PY (y));
          pen = TRUE;
        }
      if (pass == 0)
        cairo_set_source_rgb (cr, 0.78, 0.84, 0.93);
      else
        cairo_set_source_rgb (cr, 0.05, 0.25, 0.65);
      cairo_set_line_width (cr, pass == 0 ? 1 : 2);
      cairo_stroke (cr);
    }
  cairo_restore (cr);

  /* Title and axis labels. */
  cairo_set_source_rgb (cr, 0, 0, 0);
  cairo_set_font_size (cr, 16);
  cairo_move_to (cr, L, T - 18);
  cairo_show_text (cr, "Training loss");
  cairo_set_font_size (cr, 14);
  cairo_move_to (cr, (L + W - R) / 2.0 - 15, H - 20);
  cairo_show_text (cr, "step");
  cairo_save (cr);
  cairo_move_to (cr, 24, (T + H - B) / 2.0 + 90);
  cairo_rotate (cr, -G_PI / 2);
  cairo_show_text (cr, "loss (smoothed, log scale)");
  cairo_restore (cr);
#undef PX
#undef PY

  cairo_destroy (cr);
  status = cairo_surface_write_to_png (surf, png);
  cairo_surface_destroy (surf);
  if (status != CAIRO_STATUS_SUCCESS)
    {
      g_set_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID,
                   "cannot write the plot %s: %s", png,
                   cairo_status_to_string (status));
      ok = FALSE;
    }

out:
  g_array_unref (xs);
  g_array_unref (raw);
  g_array_unref (sm);
  return ok;
}
