/* test-unet.c: the UNet and the classifier against the PyTorch reference
 * (tests/reference/unet_ref.py, fixtures written by make_fixtures.py), and
 * the config's JSON and validation.
 *
 * The fixtures hold float32 weights and the results of a float64 forward
 * and backward on them, so the differences below are the engine's float32
 * rounding alone.
 */
#include <math.h>
#include <string.h>

#include "safetensors.h"
#include "unet.h"

/* Forward: worst |engine - reference| over the output. */
#define FORWARD_TOL 1e-4
/* Gradients: worst |engine - reference| of a tensor over the largest
 * |reference| of that tensor. */
#define GRAD_TOL 1e-3
/* Floor of a gradient's scale, as a fraction of the model's largest. */
#define GRAD_FLOOR 1e-3
/* Loss values, relative. */
#define LOSS_TOL 1e-5

typedef struct {
  DfSafetensors *st;
  DfUNet        *net;
  int            n;           /* batch */
  DfTensor      *x;           /* [N,Cin,H,W], caller-owned */
  float         *t;           /* [N] */
  int           *labels;      /* [N] or NULL */
} Fixture;

static float *
read_all (DfSafetensors *st, const char *name, gsize *size)
{
  gint64 shape[8];
  int ndim;
  gsize n = 1;
  float *out;
  GError *error = NULL;

  g_assert_true (df_safetensors_shape (st, name, &ndim, shape));
  for (int i = 0; i < ndim; i++)
    n *= shape[i];
  out = g_new (float, n);
  g_assert_true (df_safetensors_read_f32 (st, name, ndim, shape, out, &error));
  g_assert_no_error (error);
  if (size != NULL)
    *size = n;
  return out;
}

/* Build the network from the file's config and copy every weight by name:
 * each file weight must find its parameter (old attention names through
 * df_unet_find_param's aliases) and each parameter must be filled once. */
static void
fixture_load (Fixture *f, const char *name)
{
  char *file = g_strconcat (name, ".safetensors", NULL);
  char *path = g_test_build_filename (G_TEST_DIST, "reference", file, NULL);
  GError *error = NULL;
  DfUNetConfig cfg;
  JsonNode *root;
  const DfParam *params;
  GHashTable *filled;
  char **names;
  int n_params, n_weights = 0;
  gboolean classifier;
  gsize n;

  memset (f, 0, sizeof *f);
  f->st = df_safetensors_open (path, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (df_safetensors_get_metadata (f->st, "fixture"), ==, "1");

  root = json_from_string (df_safetensors_get_metadata (f->st, "config"),
                           &error);
  g_assert_no_error (error);
  g_assert_true (df_unet_config_from_json (&cfg, json_node_get_object (root),
                                           &error));
  g_assert_no_error (error);
  json_node_unref (root);
  classifier = g_strcmp0 (df_safetensors_get_metadata (f->st, "kind"),
                          "classifier") == 0;
  f->net = df_unet_new (&cfg, classifier, &error);
  g_assert_no_error (error);
  g_assert_nonnull (f->net);

  filled = g_hash_table_new (NULL, NULL);
  names = df_safetensors_names (f->st);
  for (int i = 0; names[i] != NULL; i++)
    {
      DfTensor *p;
      gint64 shape[8];

      if (g_str_has_prefix (names[i], "fixture."))
        continue;
      p = df_unet_find_param (f->net, names[i]);
      if (p == NULL)
        g_error ("%s: no parameter for weight %s", name, names[i]);
      g_assert_false (g_hash_table_contains (filled, p));
      g_hash_table_add (filled, p);
      for (int d = 0; d < p->ndim; d++)
        shape[d] = p->shape[d];
      g_assert_true (df_safetensors_read_f32 (f->st, names[i], p->ndim,
                                              shape, p->data, &error));
      g_assert_no_error (error);
      n_weights++;
    }
  params = df_unet_params (f->net, &n_params);
  for (int i = 0; i < n_params; i++)
    if (!g_hash_table_contains (filled, params[i].tensor))
      g_error ("%s: parameter %s is not in the file", name, params[i].name);
  g_assert_cmpint (n_weights, ==, n_params);
  g_hash_table_destroy (filled);
  g_strfreev (names);

  /* Inputs. */
  {
    gint64 shape[8];
    int ndim, xs[4];

    g_assert_true (df_safetensors_shape (f->st, "fixture.x", &ndim, shape));
    g_assert_cmpint (ndim, ==, 4);
    for (int d = 0; d < 4; d++)
      xs[d] = (int) shape[d];
    f->n = xs[0];
    f->x = df_tensor_new (4, xs);
    g_assert_true (df_safetensors_read_f32 (f->st, "fixture.x", 4, shape,
                                            f->x->data, &error));
    g_assert_no_error (error);
  }
  f->t = read_all (f->st, "fixture.t", &n);
  g_assert_cmpuint (n, ==, f->n);
  if (df_safetensors_has (f->st, "fixture.labels"))
    {
      float *l = read_all (f->st, "fixture.labels", &n);

      g_assert_cmpuint (n, ==, f->n);
      f->labels = g_new (int, f->n);
      for (int i = 0; i < f->n; i++)
        f->labels[i] = (int) l[i];
      g_free (l);
    }

  g_free (file);
  g_free (path);
}

static void
fixture_clear (Fixture *f)
{
  df_unet_free (f->net);
  df_tensor_free (f->x);
  df_safetensors_free (f->st);
  g_free (f->t);
  g_free (f->labels);
}

static double
worst_abs (const float *a, const float *b, gsize n, double *ref_max)
{
  double worst = 0, m = 0;

  for (gsize i = 0; i < n; i++)
    {
      worst = MAX (worst, fabs ((double) a[i] - b[i]));
      m = MAX (m, fabs ((double) b[i]));
    }
  if (ref_max != NULL)
    *ref_max = m;
  return worst;
}

/* ---- forward ---- */

static void
test_forward (gconstpointer data)
{
  const char *name = data;
  Fixture f;
  DfGraph *g = df_graph_new (FALSE);
  DfTensor *out;
  float *want;
  gsize n;
  double worst, ref_max;

  fixture_load (&f, name);
  out = df_unet_forward (f.net, g, f.x, f.t, f.labels);
  g_assert_nonnull (out);
  want = read_all (f.st, "fixture.out", &n);
  g_assert_cmpuint (out->size, ==, n);

  worst = worst_abs (out->data, want, n, &ref_max);
  g_test_message ("%s: worst |diff| %.3g over %zu outputs (max |ref| %.3g), "
                  "tolerance %g", name, worst, n, ref_max, FORWARD_TOL);
  g_assert_cmpfloat (worst, <, FORWARD_TOL);
  /* A reference that is all zeros would prove nothing. */
  g_assert_cmpfloat (ref_max, >, 0.1);

  g_free (want);
  df_graph_free (g);
  fixture_clear (&f);
}

/* Sample i of a batch equals a batch of one, bit for bit. */
static void
test_batch_independent (void)
{
  Fixture f;
  DfGraph *g = df_graph_new (FALSE);
  DfTensor *out;
  float *all;
  gsize per;

  fixture_load (&f, "unet-3level");
  g_assert_cmpint (f.n, >, 1);
  out = df_unet_forward (f.net, g, f.x, f.t, f.labels);
  per = out->size / f.n;
  all = g_memdup2 (out->data, out->size * sizeof (float));

  for (int i = 0; i < f.n; i++)
    {
      DfTensor *xi;
      gsize xper = f.x->size / f.n;

      df_graph_reset (g);
      xi = df_graph_tensor_4d (g, 1, f.x->shape[1], f.x->shape[2],
                               f.x->shape[3]);
      memcpy (xi->data, f.x->data + i * xper, xper * sizeof (float));
      out = df_unet_forward (f.net, g, xi, f.t + i,
                             f.labels != NULL ? f.labels + i : NULL);
      g_assert_cmpuint (out->size, ==, per);
      g_assert_cmpmem (out->data, per * sizeof (float), all + i * per,
                       per * sizeof (float));
    }

  g_free (all);
  df_graph_free (g);
  fixture_clear (&f);
}

/* ---- gradients ---- */

static void
test_grad_mse (gconstpointer data)
{
  const char *name = data;
  Fixture f;
  DfGraph *g = df_graph_new (TRUE);
  const DfParam *params;
  DfTensor *out;
  float *target, *want_loss;
  double loss, worst_rel = 0, worst_plain = 0, rel, global_max = 0;
  double *worst_of, *max_of;
  const char *worst_name = "";
  char **names;
  int n_params, n_checked = 0, worst_k = 0;
  gsize n;

  fixture_load (&f, name);
  params = df_unet_params (f.net, &n_params);
  for (int i = 0; i < n_params; i++)
    df_tensor_require_grad (params[i].tensor);

  out = df_unet_forward (f.net, g, f.x, f.t, f.labels);
  target = read_all (f.st, "fixture.target", &n);
  g_assert_cmpuint (n, ==, out->size);
  loss = df_loss_mse (g, out, target);
  df_graph_backward (g);

  want_loss = read_all (f.st, "fixture.loss", NULL);
  rel = fabs (loss - want_loss[0]) / fabs (want_loss[0]);
  g_test_message ("%s: loss %.8g, reference %.8g, relative diff %.3g "
                  "(tolerance %g)", name, loss, want_loss[0], rel, LOSS_TOL);
  g_assert_cmpfloat (rel, <, LOSS_TOL);

  /* Every parameter's gradient, under the file's names: first the worst
   * difference and largest reference value of each tensor. */
  names = df_safetensors_names (f.st);
  worst_of = g_new0 (double, n_params + 1);
  max_of = g_new0 (double, n_params + 1);
  for (int i = 0; names[i] != NULL; i++)
    {
      const char *pname;
      DfTensor *p;
      float *want;

      if (!g_str_has_prefix (names[i], "fixture.grad."))
        continue;
      g_assert_cmpint (n_checked, <, n_params);
      pname = names[i] + strlen ("fixture.grad.");
      p = df_unet_find_param (f.net, pname);
      g_assert_nonnull (p);
      want = read_all (f.st, names[i], &n);
      g_assert_cmpuint (n, ==, p->size);
      worst_of[n_checked] = worst_abs (df_tensor_grad (p), want, n,
                                       &max_of[n_checked]);
      global_max = MAX (global_max, max_of[n_checked]);
      n_checked++;
      g_free (want);
    }
  g_assert_cmpint (n_checked, ==, n_params);

  /* Relative to the tensor's largest gradient; a gradient that is zero in
   * exact arithmetic (to_k.bias: softmax ignores a per-row constant) is
   * measured against GRAD_FLOOR of the model's largest instead. */
  for (int i = 0, k = 0; names[i] != NULL; i++)
    {
      if (!g_str_has_prefix (names[i], "fixture.grad."))
        continue;
      rel = worst_of[k] / MAX (max_of[k], GRAD_FLOOR * global_max);
      if (max_of[k] >= GRAD_FLOOR * global_max)
        worst_plain = MAX (worst_plain, rel);
      if (rel > worst_rel)
        {
          worst_rel = rel;
          worst_name = names[i] + strlen ("fixture.grad.");
          worst_k = k;
        }
      k++;
    }
  g_test_message ("%s: %d gradients (max |grad| %.3g), worst relative diff "
                  "%.3g in %s (|diff| %.3g, max |ref| %.3g); tolerance %g "
                  "of the tensor's max |grad| (at least %g of the model's)",
                  name, n_checked, global_max, worst_rel, worst_name,
                  worst_of[worst_k], max_of[worst_k], GRAD_TOL, GRAD_FLOOR);
  g_test_message ("%s: worst relative diff %.3g among the tensors above "
                  "the floor", name, worst_plain);
  g_assert_cmpfloat (global_max, >, 0);
  g_assert_cmpfloat (worst_rel, <, GRAD_TOL);

  g_free (worst_of);
  g_free (max_of);
  g_strfreev (names);
  g_free (target);
  g_free (want_loss);
  df_graph_free (g);
  fixture_clear (&f);
}

/* Classifier guidance: grad of sum log p(y | x) with respect to x. */
static void
test_grad_classifier_x (void)
{
  Fixture f;
  DfGraph *g = df_graph_new (TRUE);
  DfTensor *logits;
  float *want, *want_loss;
  double logp, rel, worst, ref_max;
  gsize n;

  fixture_load (&f, "classifier");
  g_assert_nonnull (f.labels);
  df_tensor_require_grad (f.x);
  logits = df_unet_forward (f.net, g, f.x, f.t, NULL);
  g_assert_cmpint (logits->shape[0], ==, f.n);
  g_assert_cmpint (logits->shape[1], ==,
                   df_unet_config (f.net)->classifier_classes);
  logp = df_seed_log_prob (g, logits, f.labels);
  df_graph_backward (g);

  want_loss = read_all (f.st, "fixture.loss", NULL);
  rel = fabs (logp - want_loss[0]) / fabs (want_loss[0]);
  g_test_message ("classifier: log p %.8g, reference %.8g, relative diff "
                  "%.3g (tolerance %g)", logp, want_loss[0], rel, LOSS_TOL);
  g_assert_cmpfloat (rel, <, LOSS_TOL);

  want = read_all (f.st, "fixture.grad.x", &n);
  g_assert_cmpuint (n, ==, f.x->size);
  worst = worst_abs (df_tensor_grad (f.x), want, n, &ref_max);
  g_test_message ("classifier: grad x worst |diff| %.3g, max |ref| %.3g, "
                  "relative %.3g (tolerance %g)", worst, ref_max,
                  worst / ref_max, GRAD_TOL);
  g_assert_cmpfloat (ref_max, >, 0);
  g_assert_cmpfloat (worst / ref_max, <, GRAD_TOL);

  g_free (want);
  g_free (want_loss);
  df_graph_free (g);
  fixture_clear (&f);
}

/* ---- names, init, flops ---- */

static void
test_old_names (void)
{
  Fixture f;

  /* The file holds only the old names; fixture_load already required
   * every one to resolve.  Check the aliases point where they should. */
  fixture_load (&f, "unet-class-old-grad");
  g_assert_false (df_safetensors_has (f.st,
                                      "mid_block.attentions.0.to_q.weight"));
  g_assert_true (df_unet_find_param (f.net,
                                     "mid_block.attentions.0.query.weight")
                 == df_unet_find_param (f.net,
                                        "mid_block.attentions.0.to_q.weight"));
  g_assert_true (df_unet_find_param (f.net, "up_blocks.1.attentions.1."
                                     "proj_attn.bias")
                 == df_unet_find_param (f.net, "up_blocks.1.attentions.1."
                                        "to_out.0.bias"));
  g_assert_nonnull (df_unet_find_param (f.net, "down_blocks.0.attentions.0."
                                        "key.weight"));
  g_assert_null (df_unet_find_param (f.net, "down_blocks.0.query.weight"));
  g_assert_null (df_unet_find_param (f.net,
                                     "down_blocks.1.attentions.0.to_q.weight"));
  fixture_clear (&f);
}

static void
test_flops (gconstpointer data)
{
  const char *name = data;
  Fixture f;
  double want, got;

  fixture_load (&f, name);
  want = g_ascii_strtod (df_safetensors_get_metadata (f.st, "flops"), NULL);
  got = df_unet_flops (f.net, f.x->shape[2], f.x->shape[3]);
  g_test_message ("%s: %.0f flops, reference %.0f", name, got, want);
  g_assert_cmpfloat (fabs (got - want), <=, 1e-9 * want);
  fixture_clear (&f);
}

static void
test_init (void)
{
  DfUNetConfig cfg;
  DfUNet *a, *b;
  const DfParam *pa, *pb;
  int n, n_fan_in = 0;
  gboolean differs = FALSE;
  GError *error = NULL;

  df_unet_config_init (&cfg);
  cfg.sample_size = 8;
  cfg.n_blocks = 2;
  cfg.block_out_channels[0] = 8;
  cfg.block_out_channels[1] = 16;
  cfg.down_attention[0] = FALSE;
  cfg.down_attention[1] = TRUE;
  cfg.up_attention[0] = TRUE;
  cfg.up_attention[1] = FALSE;
  cfg.layers_per_block = 1;
  cfg.norm_num_groups = 4;
  cfg.attention_head_dim = 4;
  cfg.num_class_embeds = 3;
  a = df_unet_new (&cfg, FALSE, &error);
  g_assert_no_error (error);
  b = df_unet_new (&cfg, FALSE, &error);
  g_assert_no_error (error);
  df_unet_init (a, 7);
  df_unet_init (b, 7);
  pa = df_unet_params (a, &n);
  pb = df_unet_params (b, NULL);

  for (int i = 0; i < n; i++)
    {
      DfTensor *t = pa[i].tensor;
      const char *nm = pa[i].name;

      g_assert_cmpstr (nm, ==, pb[i].name);
      g_assert_cmpmem (t->data, t->size * 4, pb[i].tensor->data,
                       pb[i].tensor->size * 4);
      if (strstr (nm, "norm") != NULL)
        {
          float want = g_str_has_suffix (nm, ".weight") ? 1.0f : 0.0f;

          for (gsize k = 0; k < t->size; k++)
            g_assert_cmpfloat (t->data[k], ==, want);
        }
      else if (strcmp (nm, "class_embedding.weight") == 0)
        {
          double s2 = 0;

          for (gsize k = 0; k < t->size; k++)
            s2 += t->data[k] * (double) t->data[k];
          /* 96 N(0,1) draws: the mean square is 1 +- 0.14 (one sigma). */
          g_assert_cmpfloat (fabs (s2 / t->size - 1), <, 0.5);
        }
      else
        {
          /* U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in from the weight. */
          DfTensor *w = t->ndim == 1
                        ? df_unet_find_param (a, pa[i - 1].name) : t;
          int fan_in = w->size / w->shape[0];
          double bound = 1 / sqrt (fan_in), m = 0;

          g_assert_true (g_str_has_suffix (nm, ".weight")
                         || g_str_has_suffix (nm, ".bias"));
          for (gsize k = 0; k < t->size; k++)
            m = MAX (m, fabs (t->data[k]));
          g_assert_cmpfloat (m, <=, bound);
          if (t->size >= 64)
            g_assert_cmpfloat (m, >, 0.8 * bound);
          n_fan_in++;
        }
    }
  g_assert_cmpint (n_fan_in, >, 10);

  df_unet_init (b, 8);
  for (int i = 0; i < n && !differs; i++)
    differs = memcmp (pa[i].tensor->data, pb[i].tensor->data,
                      pa[i].tensor->size * 4) != 0;
  g_assert_true (differs);
  df_unet_free (a);
  df_unet_free (b);
}

/* ---- config ---- */

static JsonObject *
parse_object (const char *json)
{
  GError *error = NULL;
  JsonNode *root = json_from_string (json, &error);
  JsonObject *obj;

  g_assert_no_error (error);
  obj = json_object_ref (json_node_get_object (root));
  json_node_unref (root);
  return obj;
}

static void
assert_config_equal (const DfUNetConfig *a, const DfUNetConfig *b)
{
  g_assert_cmpint (a->sample_size, ==, b->sample_size);
  g_assert_cmpint (a->in_channels, ==, b->in_channels);
  g_assert_cmpint (a->out_channels, ==, b->out_channels);
  g_assert_cmpint (a->n_blocks, ==, b->n_blocks);
  for (int i = 0; i < a->n_blocks; i++)
    {
      g_assert_cmpint (a->block_out_channels[i], ==, b->block_out_channels[i]);
      g_assert_cmpint (a->down_attention[i], ==, b->down_attention[i]);
      g_assert_cmpint (a->up_attention[i], ==, b->up_attention[i]);
    }
  g_assert_cmpint (a->layers_per_block, ==, b->layers_per_block);
  g_assert_cmpint (a->norm_num_groups, ==, b->norm_num_groups);
  g_assert_cmpfloat (a->norm_eps, ==, b->norm_eps);
  g_assert_cmpint (a->attention_head_dim, ==, b->attention_head_dim);
  g_assert_cmpint (a->num_class_embeds, ==, b->num_class_embeds);
  g_assert_cmpint (a->downsample_padding, ==, b->downsample_padding);
  g_assert_cmpint (a->flip_sin_to_cos, ==, b->flip_sin_to_cos);
  g_assert_cmpfloat (a->freq_shift, ==, b->freq_shift);
  g_assert_cmpint (a->mid_attention, ==, b->mid_attention);
  g_assert_cmpfloat (a->mid_block_scale_factor, ==, b->mid_block_scale_factor);
  g_assert_cmpint (a->classifier_classes, ==, b->classifier_classes);
}

static void
test_config_defaults (void)
{
  DfUNetConfig want, got;
  JsonObject *empty = parse_object ("{}");
  GError *error = NULL;

  df_unet_config_init (&want);
  g_assert_cmpint (want.n_blocks, ==, 4);
  g_assert_cmpint (want.block_out_channels[3], ==, 896);
  g_assert_false (want.down_attention[0]);
  g_assert_true (want.down_attention[1]);
  g_assert_true (want.up_attention[0]);
  g_assert_false (want.up_attention[3]);
  g_assert_cmpint (want.norm_num_groups, ==, 32);
  g_assert_cmpint (want.attention_head_dim, ==, 8);
  g_assert_true (want.flip_sin_to_cos);

  /* Absent keys take diffusers' defaults; the defaults are valid. */
  g_assert_true (df_unet_config_from_json (&got, empty, &error));
  g_assert_no_error (error);
  assert_config_equal (&got, &want);
  g_assert_true (df_unet_config_validate (&got, &error));
  g_assert_no_error (error);
  json_object_unref (empty);
}

static void
test_config_round_trip (void)
{
  DfUNetConfig cfg, back;
  JsonNode *node;
  JsonGenerator *gen;
  JsonObject *obj;
  GError *error = NULL;
  char *text;

  df_unet_config_init (&cfg);
  cfg.sample_size = 32;
  cfg.in_channels = 1;
  cfg.out_channels = 2;
  cfg.n_blocks = 3;
  cfg.block_out_channels[0] = 32;
  cfg.block_out_channels[1] = 64;
  cfg.block_out_channels[2] = 96;
  cfg.down_attention[0] = TRUE;
  cfg.down_attention[1] = FALSE;
  cfg.down_attention[2] = TRUE;
  cfg.up_attention[0] = FALSE;
  cfg.up_attention[1] = TRUE;
  cfg.up_attention[2] = FALSE;
  cfg.layers_per_block = 3;
  cfg.norm_num_groups = 8;
  cfg.norm_eps = 1e-6;
  cfg.attention_head_dim = 0;
  cfg.num_class_embeds = 11;
  cfg.downsample_padding = 0;
  cfg.flip_sin_to_cos = FALSE;
  cfg.freq_shift = 1;
  cfg.mid_attention = FALSE;
  cfg.mid_block_scale_factor = 1.4142135623730951;
  cfg.classifier_classes = 10;
  g_assert_true (df_unet_config_validate (&cfg, &error));

  /* Through text, as a file would carry it. */
  node = df_unet_config_to_json (&cfg);
  gen = json_generator_new ();
  json_generator_set_root (gen, node);
  text = json_generator_to_data (gen, NULL);
  g_test_message ("%s", text);
  obj = parse_object (text);

  /* diffusers' spellings. */
  g_assert_cmpstr (json_object_get_string_member (obj, "_class_name"), ==,
                   "UNet2DModel");
  g_assert_cmpstr (json_array_get_string_element (
                     json_object_get_array_member (obj, "down_block_types"),
                     1), ==, "DownBlock2D");
  g_assert_cmpstr (json_array_get_string_element (
                     json_object_get_array_member (obj, "up_block_types"),
                     1), ==, "AttnUpBlock2D");
  g_assert_true (json_object_get_null_member (obj, "attention_head_dim"));
  g_assert_cmpstr (json_object_get_string_member (obj, "act_fn"), ==, "silu");

  g_assert_true (df_unet_config_from_json (&back, obj, &error));
  g_assert_no_error (error);
  assert_config_equal (&back, &cfg);

  json_object_unref (obj);
  g_free (text);
  g_object_unref (gen);
  json_node_unref (node);
}

/* Each entry: a JSON object, and the key its error must name. */
static const char *const unsupported[][2] = {
  { "{\"act_fn\": \"gelu\"}", "\"act_fn\"" },
  { "{\"time_embedding_type\": \"fourier\"}", "\"time_embedding_type\"" },
  { "{\"resnet_time_scale_shift\": \"scale_shift\"}",
    "\"resnet_time_scale_shift\"" },
  { "{\"class_embed_type\": \"timestep\"}", "\"class_embed_type\"" },
  { "{\"center_input_sample\": true}", "\"center_input_sample\"" },
  { "{\"downsample_type\": \"resnet\"}", "\"downsample_type\"" },
  { "{\"norm_num_groups\": \"32\"}", "\"norm_num_groups\"" },
  { "{\"layers_per_block\": 1.5}", "\"layers_per_block\"" },
  { "{\"down_block_types\": [\"DownBlock2D\", \"CrossAttnDownBlock2D\","
    " \"DownBlock2D\", \"DownBlock2D\"]}", "\"down_block_types\"" },
  { "{\"block_out_channels\": [32, 64]}", "\"down_block_types\"" },
  { "{\"block_out_channels\": [32, 64], \"down_block_types\": [\"DownBlock2D\","
    " \"DownBlock2D\"]}", "\"up_block_types\"" },
  { "{\"time_embedding_dim\": 100}", "\"time_embedding_dim\"" },
};

static void
test_config_unsupported (void)
{
  for (guint i = 0; i < G_N_ELEMENTS (unsupported); i++)
    {
      JsonObject *obj = parse_object (unsupported[i][0]);
      DfUNetConfig cfg;
      GError *error = NULL;

      g_assert_false (df_unet_config_from_json (&cfg, obj, &error));
      g_assert_error (error, DF_UNET_ERROR, DF_UNET_ERROR_CONFIG);
      g_test_message ("%s -> %s", unsupported[i][0], error->message);
      g_assert_nonnull (strstr (error->message, unsupported[i][1]));
      g_error_free (error);
      json_object_unref (obj);
    }
}

static void
test_config_validate (void)
{
  static const struct {
    const char *json;
    const char *key;
  } bad[] = {
    { "{\"block_out_channels\": [32, 48, 64, 96], \"norm_num_groups\": 32}",
      "\"block_out_channels\"" },
    { "{\"attention_head_dim\": 12}", "\"attention_head_dim\"" },
    { "{\"sample_size\": 36}", "\"sample_size\"" },
    { "{\"in_channels\": 0}", "\"in_channels\"" },
    { "{\"downsample_padding\": 2}", "\"downsample_padding\"" },
    { "{\"norm_eps\": 0}", "\"norm_eps\"" },
    { "{\"block_out_channels\": [8, 8, 8, 8, 8, 8, 8, 8, 8]}",
      "\"block_out_channels\"" },
  };

  for (guint i = 0; i < G_N_ELEMENTS (bad); i++)
    {
      JsonObject *obj = parse_object (bad[i].json);
      DfUNetConfig cfg;
      GError *error = NULL;

      /* Either the reader or the validator refuses it, naming the key. */
      if (df_unet_config_from_json (&cfg, obj, &error))
        {
          g_assert_no_error (error);
          g_assert_false (df_unet_config_validate (&cfg, &error));
          g_assert_null (df_unet_new (&cfg, FALSE, NULL));
        }
      g_assert_error (error, DF_UNET_ERROR, DF_UNET_ERROR_CONFIG);
      g_test_message ("%s -> %s", bad[i].json, error->message);
      g_assert_nonnull (strstr (error->message, bad[i].key));
      g_error_free (error);
      json_object_unref (obj);
    }

  /* Attention only constrains the blocks that have it: 12 channels with
   * head dim 8 are fine in a plain block. */
  {
    DfUNetConfig cfg;
    GError *error = NULL;

    df_unet_config_init (&cfg);
    cfg.n_blocks = 2;
    cfg.block_out_channels[0] = 12;
    cfg.block_out_channels[1] = 16;
    cfg.norm_num_groups = 4;
    cfg.down_attention[0] = FALSE;
    cfg.down_attention[1] = TRUE;
    cfg.up_attention[0] = TRUE;
    cfg.up_attention[1] = FALSE;
    g_assert_true (df_unet_config_validate (&cfg, &error));
    g_assert_no_error (error);
    cfg.up_attention[1] = TRUE;
    g_assert_false (df_unet_config_validate (&cfg, &error));
    g_assert_error (error, DF_UNET_ERROR, DF_UNET_ERROR_CONFIG);
    g_clear_error (&error);

    /* A classifier needs classes. */
    cfg.up_attention[1] = FALSE;
    g_assert_null (df_unet_new (&cfg, TRUE, &error));
    g_assert_error (error, DF_UNET_ERROR, DF_UNET_ERROR_CONFIG);
    g_assert_nonnull (strstr (error->message, "classifier_classes"));
    g_clear_error (&error);
  }
}

int
main (int argc, char **argv)
{
  static const char *const forward[] = {
    "unet-attn-grad", "unet-class-old-grad", "unet-lpb2", "unet-3level",
    "unet-f4-grad", "classifier",
  };

  g_test_init (&argc, &argv, NULL);

  for (guint i = 0; i < G_N_ELEMENTS (forward); i++)
    {
      char *path = g_strdup_printf ("/engine/unet/forward/%s", forward[i]);
      char *fpath = g_strdup_printf ("/engine/unet/flops/%s", forward[i]);

      g_test_add_data_func (path, forward[i], test_forward);
      g_test_add_data_func (fpath, forward[i], test_flops);
      g_free (path);
      g_free (fpath);
    }
  g_test_add_func ("/engine/unet/forward/batch-independent",
                   test_batch_independent);
  g_test_add_data_func ("/engine/unet/grad/unet-attn-grad", "unet-attn-grad",
                        test_grad_mse);
  g_test_add_data_func ("/engine/unet/grad/unet-class-old-grad",
                        "unet-class-old-grad", test_grad_mse);
  g_test_add_data_func ("/engine/unet/grad/unet-f4-grad", "unet-f4-grad",
                        test_grad_mse);
  g_test_add_func ("/engine/unet/grad/classifier-x", test_grad_classifier_x);
  g_test_add_func ("/engine/unet/params/old-attention-names", test_old_names);
  g_test_add_func ("/engine/unet/params/init", test_init);
  g_test_add_func ("/engine/unet/config/defaults", test_config_defaults);
  g_test_add_func ("/engine/unet/config/json-round-trip",
                   test_config_round_trip);
  g_test_add_func ("/engine/unet/config/unsupported",
                   test_config_unsupported);
  g_test_add_func ("/engine/unet/config/validate", test_config_validate);

  return g_test_run ();
}
