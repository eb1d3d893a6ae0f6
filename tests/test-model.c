/* test-model.c: model files (engine and diffusers layouts) and the jobs:
 * generate, interpolate, the classifier's gradient.
 *
 * Models are tiny (8x8, one channel, 8/16 channels) with df_unet_init
 * weights, so every test runs in well under a second.  Bit-identical means
 * memcmp; the classifier gradient is checked against central differences.
 */
#include <math.h>
#include <string.h>

#include <glib/gstdio.h>

#include "model.h"
#include "safetensors.h"

#define SIZE 8
#define P (SIZE * SIZE)

/* Central differences in float32 at h = 1e-2: the worst |analytic -
 * numeric| over the largest |numeric| of the batch. */
#define GRAD_TOL 5e-3

static const char *const class_names[] = { "circle", "square", "cross",
                                           NULL };
static char *tmpdir;

static char *
tmp_path (const char *name)
{
  return g_build_filename (tmpdir, name, NULL);
}

static void
tiny_config (DfUNetConfig *cfg, gboolean classifier)
{
  df_unet_config_init (cfg);
  cfg->sample_size = SIZE;
  cfg->in_channels = cfg->out_channels = 1;
  cfg->n_blocks = 2;
  cfg->block_out_channels[0] = 8;
  cfg->block_out_channels[1] = 16;
  for (int i = 0; i < DF_MAX_BLOCKS; i++)
    cfg->down_attention[i] = cfg->up_attention[i] = FALSE;
  /* Attention at 4x4 in both paths, so the old names are exercised. */
  cfg->down_attention[1] = TRUE;
  cfg->up_attention[0] = TRUE;
  cfg->layers_per_block = 1;
  cfg->norm_num_groups = 4;
  cfg->mid_attention = TRUE;
  cfg->attention_head_dim = 8;
  if (classifier)
    cfg->classifier_classes = 3;
  else
    cfg->num_class_embeds = 4;    /* 3 classes + the uncond class 3 */
}

static DfModel *
tiny_model (gboolean classifier, int T, guint64 seed)
{
  DfUNetConfig cfg;
  DfSchedule *s;
  DfModel *m;
  GError *error = NULL;

  tiny_config (&cfg, classifier);
  s = df_schedule_new (DF_BETA_LINEAR, T, 0, 0, &error);
  g_assert_no_error (error);
  m = df_model_new (&cfg, classifier, s, class_names, classifier ? -1 : 3,
                    &error);
  g_assert_no_error (error);
  df_schedule_free (s);
  df_unet_init (df_model_net (m), seed);
  return m;
}

static float *
noise (guint64 seed, int n)
{
  float *x = g_new (float, (gsize) n * P);

  for (int i = 0; i < n; i++)
    df_sample_initial_noise (seed, i, P, x + i * P);
  return x;
}

static void
assert_same_params (DfModel *a, DfModel *b)
{
  const DfParam *pa, *pb;
  int na, nb;

  pa = df_unet_params (df_model_net (a), &na);
  pb = df_unet_params (df_model_net (b), &nb);
  g_assert_cmpint (na, ==, nb);
  for (int i = 0; i < na; i++)
    {
      g_assert_cmpstr (pa[i].name, ==, pb[i].name);
      g_assert_cmpuint (pa[i].tensor->size, ==, pb[i].tensor->size);
      g_assert_cmpmem (pa[i].tensor->data, pa[i].tensor->size * 4,
                       pb[i].tensor->data, pb[i].tensor->size * 4);
    }
}

static void
assert_same_eps (DfModel *a, DfModel *b, const int *labels)
{
  float *x = noise (11, 2);
  float ea[2 * P], eb[2 * P];
  GError *error = NULL;

  g_assert_true (df_model_eps (a, x, 2, 37, labels, ea, &error));
  g_assert_no_error (error);
  g_assert_true (df_model_eps (b, x, 2, 37, labels, eb, &error));
  g_assert_no_error (error);
  g_assert_cmpmem (ea, sizeof ea, eb, sizeof eb);
  g_free (x);
}

static void
test_round_trip (void)
{
  DfModel *m = tiny_model (FALSE, 100, 1), *back;
  char *path = tmp_path ("unet.safetensors");
  const DfSchedule *s;
  DfSafetensors *st;
  GError *error = NULL;
  const int labels[2] = { 0, 3 };

  g_assert_true (df_model_save (m, path, &error));
  g_assert_no_error (error);
  g_assert_cmpstr (df_model_path (m), ==, path);

  /* The file carries model.h's metadata. */
  st = df_safetensors_open (path, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (df_safetensors_get_metadata (st, "format"), ==, "diffuse");
  g_assert_cmpstr (df_safetensors_get_metadata (st, "format_version"), ==,
                   "1");
  g_assert_cmpstr (df_safetensors_get_metadata (st, "kind"), ==, "unet");
  g_assert_cmpstr (df_safetensors_get_metadata (st, "uncond_class"), ==, "3");
  g_assert_nonnull (strstr (df_safetensors_get_metadata (st, "schedule"),
                            "\"epsilon\""));
  df_safetensors_free (st);

  back = df_model_load (path, &error);
  g_assert_no_error (error);
  g_assert_false (df_model_is_classifier (back));
  g_assert_cmpint (df_model_channels (back), ==, 1);
  g_assert_cmpint (df_model_size (back), ==, SIZE);
  g_assert_cmpint (df_model_num_classes (back), ==, 3);
  g_assert_cmpstr (df_model_class_name (back, 1), ==, "square");
  g_assert_null (df_model_class_name (back, 3));
  g_assert_cmpint (df_model_uncond_class (back), ==, 3);
  g_assert_cmpint (df_model_class_lookup (back, "cross"), ==, 2);
  g_assert_cmpint (df_model_class_lookup (back, "Circle"), ==, 0);
  g_assert_cmpint (df_model_class_lookup (back, "1"), ==, 1);
  g_assert_cmpint (df_model_class_lookup (back, "triangle"), ==, -1);
  s = df_model_schedule (back);
  g_assert_cmpint (s->kind, ==, DF_BETA_LINEAR);
  g_assert_cmpint (s->T, ==, 100);
  g_assert_cmpfloat (s->beta_start, ==, df_model_schedule (m)->beta_start);
  g_assert_cmpfloat (s->beta_end, ==, df_model_schedule (m)->beta_end);
  for (int t = 0; t < 100; t++)
    g_assert_cmpfloat (s->alphas_cumprod[t], ==,
                       df_model_schedule (m)->alphas_cumprod[t]);

  assert_same_params (m, back);
  assert_same_eps (m, back, labels);
  /* No labels on a conditional model means the uncond class. */
  {
    float *x = noise (3, 1);
    float e0[P], e1[P];
    const int uncond[1] = { 3 };

    g_assert_true (df_model_eps (back, x, 1, 5, NULL, e0, &error));
    g_assert_true (df_model_eps (back, x, 1, 5, uncond, e1, &error));
    g_assert_cmpmem (e0, sizeof e0, e1, sizeof e1);
    g_free (x);
  }
  df_model_free (back);
  df_model_free (m);
  g_free (path);
}

static void
test_classifier_round_trip (void)
{
  DfModel *m = tiny_model (TRUE, 100, 2), *back;
  char *path = tmp_path ("classifier.safetensors");
  float *x = noise (5, 2);
  float la[6], lb[6];
  GError *error = NULL;

  g_assert_true (df_model_save (m, path, &error));
  back = df_model_load (path, &error);
  g_assert_no_error (error);
  g_assert_true (df_model_is_classifier (back));
  g_assert_cmpint (df_model_num_classes (back), ==, 3);
  g_assert_cmpint (df_model_uncond_class (back), ==, -1);
  assert_same_params (m, back);
  g_assert_true (df_model_logits (m, x, 2, 50, la, &error));
  g_assert_true (df_model_logits (back, x, 2, 50, lb, &error));
  g_assert_no_error (error);
  g_assert_cmpmem (la, sizeof la, lb, sizeof lb);
  df_model_free (back);
  df_model_free (m);
  g_free (x);
  g_free (path);
}

/* ---- diffusers layouts ---- */

/* "…attentions.0.to_q.weight" -> "…attentions.0.query.weight" and so on:
 * the names diffusers used before 0.14. */
static char *
old_name (const char *name)
{
  static const char *const map[][2] = {
    { ".to_q.", ".query." }, { ".to_k.", ".key." }, { ".to_v.", ".value." },
    { ".to_out.0.", ".proj_attn." },
  };

  for (guint i = 0; i < G_N_ELEMENTS (map); i++)
    {
      const char *at = strstr (name, map[i][0]);

      if (at != NULL)
        return g_strdup_printf ("%.*s%s%s", (int) (at - name), name,
                                map[i][1], at + strlen (map[i][0]));
    }
  return g_strdup (name);
}

/* weights without metadata, optionally under the old attention names, and
 * optionally one tensor dropped. */
static void
write_plain_weights (DfModel *m, const char *path, gboolean old_names,
                     const char *drop, const char *const *metadata)
{
  const DfParam *params;
  DfSafetensorsEntry *e;
  char **names;
  int n, k = 0, renamed = 0;
  GError *error = NULL;

  params = df_unet_params (df_model_net (m), &n);
  e = g_new0 (DfSafetensorsEntry, n);
  names = g_new0 (char *, n + 1);
  for (int i = 0; i < n; i++)
    {
      if (drop != NULL && strcmp (params[i].name, drop) == 0)
        continue;
      names[k] = old_names ? old_name (params[i].name)
                           : g_strdup (params[i].name);
      renamed += strcmp (names[k], params[i].name) != 0;
      e[k].name = names[k];
      e[k].ndim = params[i].tensor->ndim;
      for (int d = 0; d < e[k].ndim; d++)
        e[k].shape[d] = params[i].tensor->shape[d];
      e[k].data = params[i].tensor->data;
      k++;
    }
  if (old_names)
    g_assert_cmpint (renamed, >=, 12);
  g_assert_true (df_safetensors_write (path, metadata, e, k, &error));
  g_assert_no_error (error);
  g_strfreev (names);
  g_free (e);
}

static void
write_text (const char *path, const char *text)
{
  GError *error = NULL;

  g_assert_true (g_file_set_contents (path, text, -1, &error));
  g_assert_no_error (error);
}

static void
write_config (DfModel *m, const char *path)
{
  JsonNode *cfg = df_unet_config_to_json (df_unet_config (df_model_net (m)));
  char *text;

  json_object_set_string_member (json_node_get_object (cfg), "_class_name",
                                 "UNet2DModel");
  text = json_to_string (cfg, TRUE);
  write_text (path, text);
  g_free (text);
  json_node_unref (cfg);
}

static void
test_diffusers_folder (void)
{
  DfModel *m = tiny_model (FALSE, 1000, 3), *back;
  char *pipe = tmp_path ("pipeline");
  char *unet = g_build_filename (pipe, "unet", NULL);
  char *sched = g_build_filename (pipe, "scheduler", NULL);
  char *weights = g_build_filename (unet, "diffusion_pytorch_model"
                                    ".safetensors", NULL);
  char *config = g_build_filename (unet, "config.json", NULL);
  char *sched_config = g_build_filename (sched, "scheduler_config.json",
                                         NULL);
  const int labels[2] = { 2, 1 };
  GError *error = NULL;

  g_assert_cmpint (g_mkdir_with_parents (unet, 0755), ==, 0);
  g_assert_cmpint (g_mkdir_with_parents (sched, 0755), ==, 0);
  write_plain_weights (m, weights, TRUE, NULL, NULL);
  write_config (m, config);

  /* Without a scheduler: DDPM's linear 1000; no names, no uncond class. */
  back = df_model_load (unet, &error);
  g_assert_no_error (error);
  g_assert_cmpint (df_model_schedule (back)->T, ==, 1000);
  g_assert_cmpint (df_model_schedule (back)->kind, ==, DF_BETA_LINEAR);
  g_assert_cmpint (df_model_uncond_class (back), ==, -1);
  g_assert_cmpint (df_model_num_classes (back), ==, 4);
  g_assert_cmpstr (df_model_class_name (back, 3), ==, "3");
  assert_same_params (m, back);
  assert_same_eps (m, back, labels);
  df_model_free (back);

  /* With the pipeline's scheduler, from the unet folder, the pipeline
   * folder and the weights file itself. */
  write_text (sched_config,
              "{\"_class_name\": \"DDPMScheduler\", \"beta_schedule\": "
              "\"squaredcos_cap_v2\", \"num_train_timesteps\": 200, "
              "\"beta_start\": 0.0001, \"beta_end\": 0.02, "
              "\"prediction_type\": \"epsilon\", \"trained_betas\": null, "
              "\"clip_sample\": true}");
  {
    const char *paths[] = { unet, pipe, weights };

    for (guint i = 0; i < G_N_ELEMENTS (paths); i++)
      {
        back = df_model_load (paths[i], &error);
        g_assert_no_error (error);
        g_assert_cmpint (df_model_schedule (back)->T, ==, 200);
        g_assert_cmpint (df_model_schedule (back)->kind, ==, DF_BETA_COSINE);
        assert_same_params (m, back);
        df_model_free (back);
      }
  }

  /* Another prediction type is refused, saying what is supported. */
  write_text (sched_config, "{\"prediction_type\": \"v_prediction\"}");
  back = df_model_load (unet, &error);
  g_assert_null (back);
  g_assert_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT);
  g_test_message ("%s", error->message);
  g_assert_nonnull (strstr (error->message, "epsilon"));
  g_clear_error (&error);

  df_model_free (m);
  g_free (pipe);
  g_free (unet);
  g_free (sched);
  g_free (weights);
  g_free (config);
  g_free (sched_config);
}

/* ---- bad files ---- */

/* The metadata df_model_save writes for m, as a key/value list. */
static char **
metadata_of (DfModel *m, const char *path)
{
  static const char *const keys[] = { "format", "format_version", "kind",
                                      "config", "schedule", "class_names",
                                      "uncond_class" };
  GPtrArray *kv = g_ptr_array_new ();
  DfSafetensors *st;
  GError *error = NULL;

  g_assert_true (df_model_save (m, path, &error));
  st = df_safetensors_open (path, &error);
  g_assert_no_error (error);
  for (guint i = 0; i < G_N_ELEMENTS (keys); i++)
    {
      g_ptr_array_add (kv, g_strdup (keys[i]));
      g_ptr_array_add (kv, g_strdup (df_safetensors_get_metadata (st,
                                                                  keys[i])));
    }
  g_ptr_array_add (kv, NULL);
  df_safetensors_free (st);
  return (char **) g_ptr_array_free (kv, FALSE);
}

static void
assert_load_fails (const char *path, GQuark domain, int code)
{
  GError *error = NULL;
  DfModel *m = df_model_load (path, &error);

  g_assert_null (m);
  g_assert_error (error, domain, code);
  g_test_message ("%s", error->message);
  g_assert_nonnull (strstr (error->message, path));
  g_error_free (error);
}

static void
test_missing_tensor (void)
{
  DfModel *m = tiny_model (FALSE, 100, 4);
  char *path = tmp_path ("missing.safetensors");
  char **meta = metadata_of (m, path);

  write_plain_weights (m, path, FALSE, "mid_block.attentions.0.to_k.bias",
                       (const char *const *) meta);
  assert_load_fails (path, DF_SAFETENSORS_ERROR,
                     DF_SAFETENSORS_ERROR_MISSING);
  g_strfreev (meta);
  df_model_free (m);
  g_free (path);
}

static void
test_wrong_shape (void)
{
  DfModel *m = tiny_model (FALSE, 100, 5), *wide;
  char *path = tmp_path ("shape.safetensors");
  char **meta = metadata_of (m, path);
  DfUNetConfig cfg;
  DfSchedule *s;
  GError *error = NULL;

  /* Weights of a wider network under m's config. */
  tiny_config (&cfg, FALSE);
  cfg.block_out_channels[0] = 16;
  cfg.block_out_channels[1] = 32;
  s = df_schedule_new (DF_BETA_LINEAR, 100, 0, 0, &error);
  wide = df_model_new (&cfg, FALSE, s, NULL, -1, &error);
  g_assert_no_error (error);
  write_plain_weights (wide, path, FALSE, NULL, (const char *const *) meta);
  assert_load_fails (path, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_SHAPE);

  df_schedule_free (s);
  df_model_free (wide);
  g_strfreev (meta);
  df_model_free (m);
  g_free (path);
}

static void
test_not_our_format (void)
{
  DfModel *m = tiny_model (FALSE, 100, 6);
  char *dir = tmp_path ("lonely");
  char *path = g_build_filename (dir, "weights.safetensors", NULL);
  char *other = tmp_path ("other.safetensors");
  char **meta = metadata_of (m, other);
  GError *error = NULL;

  /* Plain weights with no config.json beside them. */
  g_assert_cmpint (g_mkdir_with_parents (dir, 0755), ==, 0);
  write_plain_weights (m, path, FALSE, NULL, NULL);
  assert_load_fails (path, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT);

  /* Another program's format, then a newer version of ours. */
  g_free (meta[1]);
  meta[1] = g_strdup ("someone-else");
  write_plain_weights (m, other, FALSE, NULL, (const char *const *) meta);
  assert_load_fails (other, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT);
  g_free (meta[1]);
  meta[1] = g_strdup ("diffuse");
  g_free (meta[3]);
  meta[3] = g_strdup ("2");
  write_plain_weights (m, other, FALSE, NULL, (const char *const *) meta);
  {
    DfModel *back = df_model_load (other, &error);

    g_assert_null (back);
    g_assert_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT);
    g_assert_nonnull (strstr (error->message, "update diffuse"));
    g_clear_error (&error);
  }

  /* A folder that is no model, and a file that is no safetensors. */
  assert_load_fails (dir, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT);
  write_text (path, "hello");
  assert_load_fails (path, DF_SAFETENSORS_ERROR,
                     DF_SAFETENSORS_ERROR_FORMAT);

  g_strfreev (meta);
  df_model_free (m);
  g_free (path);
  g_free (other);
  g_free (dir);
}

/* ---- jobs ---- */

static void
ddpm_params (DfSampleParams *p)
{
  df_sample_params_init (p);
  p->sampler = DF_SAMPLER_DDPM;
  p->steps = 4;
  p->seed = 1234;
  p->label = 1;
  p->guidance = DF_GUIDANCE_FREE;
  p->scale = 2.5;
}

static void
test_generate_batch_invariant (void)
{
  DfModel *m = tiny_model (FALSE, 100, 7);
  DfSampleParams p;
  float *a = g_new (float, 4 * P), *b = g_new (float, 4 * P);
  float *c = g_new (float, 3 * P);
  GError *error = NULL;

  /* DDPM draws noise every step, free guidance doubles the batch. */
  ddpm_params (&p);
  g_assert_true (df_model_generate (m, NULL, &p, 4, 4, a, NULL, NULL, NULL,
                                    &error));
  g_assert_no_error (error);
  g_assert_true (df_model_generate (m, NULL, &p, 4, 1, b, NULL, NULL, NULL,
                                    &error));
  g_assert_no_error (error);
  g_assert_cmpmem (a, 4 * P * 4, b, 4 * P * 4);
  g_assert_true (df_model_generate (m, NULL, &p, 3, 2, c, NULL, NULL, NULL,
                                    &error));
  g_assert_cmpmem (a, 3 * P * 4, c, 3 * P * 4);

  /* Samples differ from one another (the noise is per index). */
  g_assert_true (memcmp (a, a + P, P * 4) != 0);
  g_free (a);
  g_free (b);
  g_free (c);
  df_model_free (m);
}

static void
test_generate_thread_invariant (void)
{
  DfModel *m = tiny_model (FALSE, 100, 8);
  DfSampleParams p;
  float *a = g_new (float, 3 * P), *b = g_new (float, 3 * P);
  GError *error = NULL;

  ddpm_params (&p);
  df_set_threads (1);
  g_assert_cmpint (df_get_threads (), ==, 1);
  g_assert_true (df_model_generate (m, NULL, &p, 3, 3, a, NULL, NULL, NULL,
                                    &error));
  df_set_threads (2);
  g_assert_cmpint (df_get_threads (), ==, 2);
  g_assert_true (df_model_generate (m, NULL, &p, 3, 3, b, NULL, NULL, NULL,
                                    &error));
  g_assert_no_error (error);
  g_assert_cmpmem (a, 3 * P * 4, b, 3 * P * 4);
  df_set_threads (0);
  g_free (a);
  g_free (b);
  df_model_free (m);
}

typedef struct {
  int calls, last_step, total;
  gboolean monotonic;
} ProgressLog;

static void
log_progress (gpointer data, int step, int total, const float *x0, int n)
{
  ProgressLog *l = data;

  l->monotonic &= step == l->last_step + 1 && x0 != NULL && n >= 1;
  l->calls++;
  l->last_step = step;
  l->total = total;
}

static void
test_generate_progress (void)
{
  DfModel *m = tiny_model (FALSE, 100, 9);
  DfSampleParams p;
  ProgressLog l = { 0, 0, 0, TRUE };
  float *out = g_new (float, 5 * P);
  GError *error = NULL;

  df_sample_params_init (&p);
  p.steps = 3;
  g_assert_true (df_model_generate (m, NULL, &p, 5, 2, out, log_progress, &l,
                                    NULL, &error));
  g_assert_no_error (error);
  /* 3 batches x 3 steps, numbered 1..9 against a total of 9. */
  g_assert_cmpint (l.calls, ==, 9);
  g_assert_cmpint (l.last_step, ==, 9);
  g_assert_cmpint (l.total, ==, 9);
  g_assert_true (l.monotonic);
  g_free (out);
  df_model_free (m);
}

static void
test_generate_invalid (void)
{
  DfModel *m = tiny_model (FALSE, 100, 10);
  DfModel *clf = tiny_model (TRUE, 100, 11);
  DfModel *clf_t = tiny_model (TRUE, 50, 11);
  DfSampleParams p;
  float out[P];
  GError *error = NULL;

  df_sample_params_init (&p);
  p.steps = 2;
  g_assert_false (df_model_generate (m, NULL, &p, 0, 1, out, NULL, NULL,
                                     NULL, &error));
  g_assert_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID);
  g_clear_error (&error);
  g_assert_false (df_model_generate (m, NULL, &p, 1, 0, out, NULL, NULL,
                                     NULL, &error));
  g_assert_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID);
  g_clear_error (&error);

  /* Label out of range, and a classifier given as the UNet. */
  p.label = 7;
  g_assert_false (df_model_generate (m, NULL, &p, 1, 1, out, NULL, NULL,
                                     NULL, &error));
  g_assert_nonnull (error);
  g_test_message ("%s", error->message);
  g_clear_error (&error);
  p.label = 1;
  g_assert_false (df_model_generate (clf, NULL, &p, 1, 1, out, NULL, NULL,
                                     NULL, &error));
  g_assert_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID);
  g_clear_error (&error);

  /* Classifier guidance: absent, not a classifier, another schedule. */
  p.guidance = DF_GUIDANCE_CLASSIFIER;
  g_assert_false (df_model_generate (m, NULL, &p, 1, 1, out, NULL, NULL,
                                     NULL, &error));
  g_assert_nonnull (error);
  g_test_message ("%s", error->message);
  g_clear_error (&error);
  g_assert_false (df_model_generate (m, m, &p, 1, 1, out, NULL, NULL, NULL,
                                     &error));
  g_assert_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID);
  g_clear_error (&error);
  g_assert_false (df_model_generate (m, clf_t, &p, 1, 1, out, NULL, NULL,
                                     NULL, &error));
  g_assert_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID);
  g_test_message ("%s", error->message);
  g_clear_error (&error);

  /* With a matching classifier it runs, and the batch size still does not
   * matter. */
  {
    float a[3 * P], b[3 * P];

    p.scale = 3.0;
    g_assert_true (df_model_generate (m, clf, &p, 3, 3, a, NULL, NULL, NULL,
                                      &error));
    g_assert_no_error (error);
    g_assert_true (df_model_generate (m, clf, &p, 3, 1, b, NULL, NULL, NULL,
                                      &error));
    g_assert_cmpmem (a, sizeof a, b, sizeof b);
  }
  df_model_free (m);
  df_model_free (clf);
  df_model_free (clf_t);
}

/* One NaN weight poisons every output: an error, not black images. */
static void
test_nan_weight (void)
{
  DfModel *m = tiny_model (FALSE, 100, 12);
  DfTensor *w = df_unet_find_param (df_model_net (m), "conv_in.weight");
  DfSampleParams p;
  float out[P];
  GError *error = NULL;

  w->data[0] = NAN;
  df_sample_params_init (&p);
  p.steps = 2;
  g_assert_false (df_model_generate (m, NULL, &p, 1, 1, out, NULL, NULL,
                                     NULL, &error));
  g_assert_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT);
  g_test_message ("%s", error->message);
  g_clear_error (&error);
  df_model_free (m);
}

static void
test_interpolate_ends (void)
{
  DfModel *m = tiny_model (FALSE, 100, 12);
  DfSampleParams p;
  float *frames = g_new (float, 5 * P);
  float a[P], b[P];
  GError *error = NULL;

  df_sample_params_init (&p);
  p.steps = 4;
  p.label = 2;

  p.seed = 21;
  g_assert_true (df_model_generate (m, NULL, &p, 1, 1, a, NULL, NULL, NULL,
                                    &error));
  p.seed = 22;
  g_assert_true (df_model_generate (m, NULL, &p, 1, 1, b, NULL, NULL, NULL,
                                    &error));
  g_assert_no_error (error);

  /* DDPM asked for: interpolation decodes with DDIM eta 0 anyway. */
  p.sampler = DF_SAMPLER_DDPM;
  p.eta = 1.0;
  g_assert_true (df_model_interpolate (m, &p, 21, 22, 5, 2, frames, NULL,
                                       NULL, NULL, &error));
  g_assert_no_error (error);
  g_assert_cmpmem (frames, sizeof a, a, sizeof a);
  g_assert_cmpmem (frames + 4 * P, sizeof b, b, sizeof b);
  g_assert_true (memcmp (frames + 2 * P, a, sizeof a) != 0);
  g_assert_true (memcmp (frames + 2 * P, b, sizeof b) != 0);
  g_free (frames);
  df_model_free (m);
}

static void
test_class_grad (void)
{
  DfModel *clf = tiny_model (TRUE, 100, 13);
  const int labels[2] = { 2, 0 };
  float *x = noise (17, 2);
  float grad[2 * P];
  double worst = 0, scale = 0;
  GError *error = NULL;
  const float h = 1e-2f;

  g_assert_true (df_model_class_grad (clf, x, 2, 30, labels, grad, &error));
  g_assert_no_error (error);

  /* d/dx_j sum_i log softmax(logits_i)[label_i], numerically. */
  for (int j = 0; j < 2 * P; j += 9)
    {
      double lp[2];

      for (int s = 0; s < 2; s++)
        {
          float logits[6], keep = x[j];

          x[j] = keep + (s ? -h : h);
          g_assert_true (df_model_logits (clf, x, 2, 30, logits, &error));
          x[j] = keep;
          lp[s] = 0;
          for (int i = 0; i < 2; i++)
            {
              double mx = MAX (logits[3 * i], MAX (logits[3 * i + 1],
                                                   logits[3 * i + 2]));
              double z = 0;

              for (int k = 0; k < 3; k++)
                z += exp (logits[3 * i + k] - mx);
              lp[s] += logits[3 * i + labels[i]] - mx - log (z);
            }
        }
      {
        double num = (lp[0] - lp[1]) / (2 * h);

        worst = MAX (worst, fabs (num - grad[j]));
        scale = MAX (scale, fabs (num));
      }
    }
  g_test_message ("classifier grad: worst |analytic - numeric| %.3g, "
                  "largest |numeric| %.3g (tolerance %.g relative)", worst,
                  scale, GRAD_TOL);
  g_assert_cmpfloat (scale, >, 0);
  g_assert_cmpfloat (worst, <=, GRAD_TOL * scale);
  g_free (x);
  df_model_free (clf);
}

static void
remove_tree (const char *path)
{
  GDir *dir = g_dir_open (path, 0, NULL);
  const char *name;

  while (dir != NULL && (name = g_dir_read_name (dir)) != NULL)
    {
      char *p = g_build_filename (path, name, NULL);

      if (g_file_test (p, G_FILE_TEST_IS_DIR))
        remove_tree (p);
      else
        g_unlink (p);
      g_free (p);
    }
  if (dir != NULL)
    g_dir_close (dir);
  g_rmdir (path);
}

int
main (int argc, char **argv)
{
  GError *error = NULL;
  int ret;

  g_test_init (&argc, &argv, NULL);
  tmpdir = g_dir_make_tmp ("test-model-XXXXXX", &error);
  g_assert_no_error (error);

  g_test_add_func ("/engine/model/save-load-round-trip", test_round_trip);
  g_test_add_func ("/engine/model/classifier-round-trip",
                   test_classifier_round_trip);
  g_test_add_func ("/engine/model/diffusers-folder", test_diffusers_folder);
  g_test_add_func ("/engine/model/missing-tensor", test_missing_tensor);
  g_test_add_func ("/engine/model/wrong-shape", test_wrong_shape);
  g_test_add_func ("/engine/model/not-our-format", test_not_our_format);
  g_test_add_func ("/engine/model/generate-batch-invariant",
                   test_generate_batch_invariant);
  g_test_add_func ("/engine/model/generate-thread-invariant",
                   test_generate_thread_invariant);
  g_test_add_func ("/engine/model/generate-progress", test_generate_progress);
  g_test_add_func ("/engine/model/generate-invalid", test_generate_invalid);
  g_test_add_func ("/engine/model/nan-weight-is-an-error", test_nan_weight);
  g_test_add_func ("/engine/model/interpolate-ends", test_interpolate_ends);
  g_test_add_func ("/engine/model/classifier-grad", test_class_grad);
  ret = g_test_run ();

  remove_tree (tmpdir);
  g_free (tmpdir);
  return ret;
}
