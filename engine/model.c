/* model.c: model files and the jobs run on them (see model.h).
 *
 * Legend: N batch, C channels, H = W = sample_size, P = C*H*W, K classes.
 */
#include "model.h"

#include <math.h>
#include <string.h>

#include <omp.h>

#include "blas.h"
#include "safetensors.h"

struct _DfModel {
  DfUNet     *net;
  DfSchedule *schedule;
  gboolean    classifier;
  char      **class_names;   /* [num_classes], NULL-terminated */
  int         num_classes;
  int         uncond_class;
  char       *path;

  /* One forward pass at a time per model: the graphs are reused so that a
   * sampler's repeated passes allocate nothing. */
  GMutex      lock;
  DfGraph    *graph;         /* not recording: eps and logits */
  DfGraph    *grad_graph;    /* recording: classifier gradients */
  float      *tbuf;          /* [tbuf_len] the timestep, as float */
  int        *lbuf;          /* [tbuf_len] labels filled in for NULL */
  int         tbuf_len;
};

G_DEFINE_QUARK (df-model-error-quark, df_model_error)

#define DF_FORMAT_VERSION "1"

/* ---- construction ---- */

/* Labels the network's class embedding takes (0: unconditional). */
static int
embed_classes (DfModel *m)
{
  return m->classifier ? 0 : df_unet_config (m->net)->num_class_embeds;
}

static DfModel *
model_build (const DfUNetConfig *cfg, gboolean classifier,
             DfSchedule *schedule, const char *const *class_names,
             int uncond_class, const char *where, GError **error)
{
  int limit = classifier ? cfg->classifier_classes : cfg->num_class_embeds;
  int n_names = class_names ? g_strv_length ((char **) class_names) : 0;
  DfModel *m;

  /* The config must describe something the sampler can use. */
  if (!classifier && cfg->out_channels != cfg->in_channels)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: out_channels %d differs from in_channels %d; diffuse "
                   "runs models that predict the noise only (learned "
                   "variance is not supported)", where, cfg->out_channels,
                   cfg->in_channels);
      return NULL;
    }
  if (n_names > limit)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: %d class names for a %s with %d classes; give at "
                   "most %d names", where, n_names,
                   classifier ? "classifier" : "UNet", limit, limit);
      return NULL;
    }
  if (uncond_class != -1
      && (classifier || uncond_class < 0 || uncond_class >= limit))
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: uncond_class %d is not a class embedding of this "
                   "model (use -1, or 0..%d)", where, uncond_class,
                   classifier ? -1 : limit - 1);
      return NULL;
    }

  m = g_new0 (DfModel, 1);
  g_mutex_init (&m->lock);
  m->classifier = classifier;
  m->uncond_class = uncond_class;
  m->net = df_unet_new (cfg, classifier, error);
  if (m->net == NULL)
    {
      g_prefix_error (error, "%s: ", where);
      df_model_free (m);
      return NULL;
    }
  m->schedule = schedule;

  /* Named classes: the names given, else the class indices (the uncond
   * class is not a named class). */
  if (n_names > 0)
    {
      m->class_names = g_strdupv ((char **) class_names);
      m->num_classes = n_names;
    }
  else
    {
      int k = limit - (uncond_class == limit - 1 ? 1 : 0);

      m->num_classes = MAX (k, 0);
      m->class_names = g_new0 (char *, m->num_classes + 1);
      for (int i = 0; i < m->num_classes; i++)
        m->class_names[i] = g_strdup_printf ("%d", i);
    }
  return m;
}

DfModel *
df_model_new (const DfUNetConfig *cfg, gboolean classifier,
              const DfSchedule *schedule, const char *const *class_names,
              int uncond_class, GError **error)
{
  DfSchedule *s;
  DfModel *m;

  g_return_val_if_fail (cfg != NULL && schedule != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  s = df_schedule_new (schedule->kind, schedule->T, schedule->beta_start,
                       schedule->beta_end, error);
  if (s == NULL)
    return NULL;
  m = model_build (cfg, classifier, s, class_names, uncond_class,
                   "new model", error);
  if (m == NULL)
    df_schedule_free (s);
  return m;
}

void
df_model_free (DfModel *m)
{
  if (m == NULL)
    return;
  df_unet_free (m->net);
  df_schedule_free (m->schedule);
  g_strfreev (m->class_names);
  g_free (m->path);
  if (m->graph != NULL)
    df_graph_free (m->graph);
  if (m->grad_graph != NULL)
    df_graph_free (m->grad_graph);
  g_free (m->tbuf);
  g_free (m->lbuf);
  g_mutex_clear (&m->lock);
  g_free (m);
}

/* ---- loading ---- */

/* A string member, or NULL (absent, null or not a string). */
static const char *
member_string (JsonObject *o, const char *key)
{
  JsonNode *node = json_object_get_member (o, key);

  if (node == NULL || !JSON_NODE_HOLDS_VALUE (node)
      || json_node_get_value_type (node) != G_TYPE_STRING)
    return NULL;
  return json_node_get_string (node);
}

static JsonNode *
parse_json (const char *text, const char *what, const char *where,
            GError **error)
{
  JsonParser *parser = json_parser_new ();
  GError *local = NULL;
  JsonNode *root = NULL;

  if (!json_parser_load_from_data (parser, text, -1, &local))
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: %s is not valid JSON (%s)", where, what,
                   local->message);
      g_error_free (local);
    }
  else
    root = json_node_copy (json_parser_get_root (parser));
  g_object_unref (parser);
  return root;
}

static JsonNode *
parse_json_file (const char *path, GError **error)
{
  char *text;
  GError *local = NULL;
  JsonNode *root;

  if (!g_file_get_contents (path, &text, NULL, &local))
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT, "%s",
                   local->message);
      g_error_free (local);
      return NULL;
    }
  root = parse_json (text, "the file", path, error);
  g_free (text);
  return root;
}

static JsonObject *
as_object (JsonNode *node, const char *what, const char *where,
           GError **error)
{
  if (node != NULL && JSON_NODE_HOLDS_OBJECT (node))
    return json_node_get_object (node);
  if (node != NULL)
    g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                 "%s: %s is not a JSON object", where, what);
  return NULL;
}

/* diffusers' scheduler keys (DDPMScheduler / DDIMScheduler). */
static DfSchedule *
schedule_from_json (JsonObject *o, const char *where, GError **error)
{
  DfBetaSchedule kind = DF_BETA_LINEAR;
  int T = 1000;
  double start = 0, end = 0;
  const char *name;
  JsonNode *node;
  DfSchedule *s;

  if (json_object_has_member (o, "beta_schedule"))
    {
      name = member_string (o, "beta_schedule");
      if (name == NULL || !df_beta_schedule_parse (name, &kind))
        {
          g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                       "%s: beta_schedule \"%s\" is not supported (use "
                       "linear, scaled_linear or squaredcos_cap_v2)", where,
                       name ? name : "?");
          return NULL;
        }
    }
  node = json_object_get_member (o, "num_train_timesteps");
  if (node != NULL && JSON_NODE_HOLDS_VALUE (node))
    T = (int) json_node_get_int (node);
  node = json_object_get_member (o, "beta_start");
  if (node != NULL && JSON_NODE_HOLDS_VALUE (node))
    start = json_node_get_double (node);
  node = json_object_get_member (o, "beta_end");
  if (node != NULL && JSON_NODE_HOLDS_VALUE (node))
    end = json_node_get_double (node);
  node = json_object_get_member (o, "trained_betas");
  if (node != NULL && !JSON_NODE_HOLDS_NULL (node))
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: trained_betas are not supported; give a "
                   "beta_schedule instead", where);
      return NULL;
    }
  if (json_object_has_member (o, "prediction_type"))
    {
      name = member_string (o, "prediction_type");
      if (g_strcmp0 (name, "epsilon") != 0)
        {
          g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                       "%s: prediction_type \"%s\" is not supported; diffuse "
                       "runs models that predict the noise (\"epsilon\")",
                       where, name ? name : "?");
          return NULL;
        }
    }

  s = df_schedule_new (kind, T, start, end, error);
  if (s == NULL)
    g_prefix_error (error, "%s: ", where);
  return s;
}

static JsonNode *
schedule_to_json (const DfSchedule *s)
{
  JsonBuilder *b = json_builder_new ();
  JsonNode *root;

  json_builder_begin_object (b);
  json_builder_set_member_name (b, "beta_schedule");
  json_builder_add_string_value (b, df_beta_schedule_name (s->kind));
  json_builder_set_member_name (b, "num_train_timesteps");
  json_builder_add_int_value (b, s->T);
  json_builder_set_member_name (b, "beta_start");
  json_builder_add_double_value (b, s->beta_start);
  json_builder_set_member_name (b, "beta_end");
  json_builder_add_double_value (b, s->beta_end);
  json_builder_set_member_name (b, "prediction_type");
  json_builder_add_string_value (b, "epsilon");
  json_builder_end_object (b);
  root = json_builder_get_root (b);
  g_object_unref (b);
  return root;
}

/* Every parameter of the network from st, under its name or an older
 * alias; tensors the network does not use (EMA copies...) are skipped. */
static gboolean
read_params (DfModel *m, DfSafetensors *st, GError **error)
{
  GHashTable *own = g_hash_table_new (NULL, NULL);     /* tensor -> name */
  GHashTable *source = g_hash_table_new (NULL, NULL);  /* tensor -> name */
  char **names = df_safetensors_names (st);
  const DfParam *params;
  int n_params, missing = 0;
  const char *first_missing = NULL;
  gboolean ok = TRUE;

  params = df_unet_params (m->net, &n_params);
  for (int i = 0; i < n_params; i++)
    g_hash_table_insert (own, params[i].tensor, params[i].name);

  /* Which file tensor feeds which parameter; the exact name wins over an
   * alias should a file hold both. */
  for (int i = 0; names[i] != NULL; i++)
    {
      DfTensor *t = df_unet_find_param (m->net, names[i]);

      if (t == NULL)
        g_debug ("%s: tensor %s is not a parameter; skipped",
                 df_safetensors_path (st), names[i]);
      else if (!g_hash_table_contains (source, t)
               || strcmp (g_hash_table_lookup (own, t), names[i]) == 0)
        g_hash_table_insert (source, t, names[i]);
    }

  for (int i = 0; i < n_params; i++)
    if (!g_hash_table_contains (source, params[i].tensor))
      {
        if (first_missing == NULL)
          first_missing = params[i].name;
        missing++;
      }
  if (missing > 0)
    {
      g_set_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_MISSING,
                   "%s: the model's config needs tensor \"%s\" (%d missing "
                   "in all), which the file lacks; the config does not match "
                   "the weights, or the file is not a UNet2DModel",
                   df_safetensors_path (st), first_missing, missing);
      ok = FALSE;
    }

  /* Read each one with its exact shape. */
  for (int i = 0; ok && i < n_params; i++)
    {
      DfTensor *t = params[i].tensor;
      gint64 shape[8];

      for (int d = 0; d < t->ndim; d++)
        shape[d] = t->shape[d];
      ok = df_safetensors_read_f32 (st, g_hash_table_lookup (source, t),
                                    t->ndim, shape, t->data, error);
    }
  g_hash_table_destroy (own);
  g_hash_table_destroy (source);
  g_strfreev (names);
  return ok;
}

/* A diffusers UNet: config.json beside the weights, the scheduler in
 * ../scheduler/scheduler_config.json when there is one. */
static DfModel *
load_diffusers (const char *weights, const char *config_path, GError **error)
{
  char *dir = g_path_get_dirname (config_path);
  char *sched_path = g_build_filename (dir, "..", "scheduler",
                                       "scheduler_config.json", NULL);
  JsonNode *cfg_node = NULL, *sched_node = NULL;
  JsonObject *cobj, *sobj;
  DfSafetensors *st = NULL;
  DfSchedule *s = NULL;
  DfModel *m = NULL;
  DfUNetConfig cfg;
  const char *cls;

  /* The network's config. */
  cfg_node = parse_json_file (config_path, error);
  if (cfg_node == NULL)
    goto out;
  cobj = as_object (cfg_node, "the config", config_path, error);
  if (cobj == NULL)
    goto out;
  cls = member_string (cobj, "_class_name");
  if (cls != NULL && strcmp (cls, "UNet2DModel") != 0)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: the model is a %s; diffuse runs UNet2DModel",
                   config_path, cls);
      goto out;
    }
  df_unet_config_init (&cfg);
  if (!df_unet_config_from_json (&cfg, cobj, error))
    {
      g_prefix_error (error, "%s: ", config_path);
      goto out;
    }

  /* The schedule: the pipeline's scheduler, or DDPM's linear 1000. */
  if (g_file_test (sched_path, G_FILE_TEST_IS_REGULAR))
    {
      sched_node = parse_json_file (sched_path, error);
      if (sched_node == NULL)
        goto out;
      sobj = as_object (sched_node, "the scheduler config", sched_path,
                        error);
      if (sobj == NULL)
        goto out;
      s = schedule_from_json (sobj, sched_path, error);
    }
  else
    s = df_schedule_new (DF_BETA_LINEAR, 1000, 0, 0, error);
  if (s == NULL)
    goto out;

  st = df_safetensors_open (weights, error);
  if (st == NULL)
    goto out;
  m = model_build (&cfg, cfg.classifier_classes > 0, s, NULL, -1, weights,
                   error);
  if (m == NULL)
    goto out;
  s = NULL;
  if (!read_params (m, st, error))
    g_clear_pointer (&m, df_model_free);

out:
  if (s != NULL)
    df_schedule_free (s);
  df_safetensors_free (st);
  if (cfg_node != NULL)
    json_node_unref (cfg_node);
  if (sched_node != NULL)
    json_node_unref (sched_node);
  g_free (sched_path);
  g_free (dir);
  return m;
}

/* An engine file: everything in __metadata__. */
static DfModel *
load_engine (DfSafetensors *st, GError **error)
{
  const char *path = df_safetensors_path (st);
  const char *version = df_safetensors_get_metadata (st, "format_version");
  const char *kind = df_safetensors_get_metadata (st, "kind");
  const char *cfg_text = df_safetensors_get_metadata (st, "config");
  const char *sched_text = df_safetensors_get_metadata (st, "schedule");
  const char *names_text = df_safetensors_get_metadata (st, "class_names");
  const char *uncond_text = df_safetensors_get_metadata (st, "uncond_class");
  JsonNode *cfg_node = NULL, *sched_node = NULL, *names_node = NULL;
  GPtrArray *names = g_ptr_array_new_with_free_func (g_free);
  DfSchedule *s = NULL;
  DfModel *m = NULL;
  DfUNetConfig cfg;
  JsonObject *obj;
  gboolean classifier;
  gint64 uncond = -1;

  /* The version and the kind. */
  if (g_strcmp0 (version, DF_FORMAT_VERSION) != 0)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: format_version \"%s\" is not supported; this diffuse "
                   "reads version " DF_FORMAT_VERSION " (update diffuse, or "
                   "save the model again with this version)", path,
                   version ? version : "(none)");
      goto out;
    }
  if (g_strcmp0 (kind, "unet") != 0 && g_strcmp0 (kind, "classifier") != 0)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: kind \"%s\" is not \"unet\" or \"classifier\"; the "
                   "file is damaged", path, kind ? kind : "(none)");
      goto out;
    }
  classifier = strcmp (kind, "classifier") == 0;
  if (cfg_text == NULL || sched_text == NULL)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: the metadata lacks \"%s\"; the file is damaged", path,
                   cfg_text == NULL ? "config" : "schedule");
      goto out;
    }

  /* The network's config and the schedule. */
  cfg_node = parse_json (cfg_text, "the config metadata", path, error);
  if (cfg_node == NULL
      || (obj = as_object (cfg_node, "the config metadata", path,
                           error)) == NULL)
    goto out;
  df_unet_config_init (&cfg);
  if (!df_unet_config_from_json (&cfg, obj, error))
    {
      g_prefix_error (error, "%s: ", path);
      goto out;
    }
  sched_node = parse_json (sched_text, "the schedule metadata", path, error);
  if (sched_node == NULL
      || (obj = as_object (sched_node, "the schedule metadata", path,
                           error)) == NULL)
    goto out;
  s = schedule_from_json (obj, path, error);
  if (s == NULL)
    goto out;

  /* Class names and the unconditional class. */
  if (names_text != NULL)
    {
      JsonArray *arr;

      names_node = parse_json (names_text, "class_names", path, error);
      if (names_node == NULL)
        goto out;
      if (!JSON_NODE_HOLDS_ARRAY (names_node))
        {
          g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                       "%s: class_names is not a JSON array", path);
          goto out;
        }
      arr = json_node_get_array (names_node);
      for (guint i = 0; i < json_array_get_length (arr); i++)
        {
          JsonNode *e = json_array_get_element (arr, i);

          if (!JSON_NODE_HOLDS_VALUE (e)
              || json_node_get_value_type (e) != G_TYPE_STRING)
            {
              g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                           "%s: class_names[%u] is not a string", path, i);
              goto out;
            }
          g_ptr_array_add (names, g_strdup (json_node_get_string (e)));
        }
    }
  g_ptr_array_add (names, NULL);
  if (uncond_text != NULL
      && !g_ascii_string_to_signed (uncond_text, 10, -1, G_MAXINT, &uncond,
                                    NULL))
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: uncond_class \"%s\" is not an integer >= -1", path,
                   uncond_text);
      goto out;
    }

  m = model_build (&cfg, classifier, s, (const char *const *) names->pdata,
                   (int) uncond, path, error);
  if (m == NULL)
    goto out;
  s = NULL;
  if (!read_params (m, st, error))
    g_clear_pointer (&m, df_model_free);

out:
  if (s != NULL)
    df_schedule_free (s);
  if (cfg_node != NULL)
    json_node_unref (cfg_node);
  if (sched_node != NULL)
    json_node_unref (sched_node);
  if (names_node != NULL)
    json_node_unref (names_node);
  g_ptr_array_free (names, TRUE);
  return m;
}

DfModel *
df_model_load (const char *path, GError **error)
{
  DfSafetensors *st;
  const char *format;
  DfModel *m = NULL;
  char *dir, *config;

  g_return_val_if_fail (path != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  /* A diffusers folder: the UNet's own, or a pipeline's with unet/. */
  if (g_file_test (path, G_FILE_TEST_IS_DIR))
    {
      char *sub = g_build_filename (path, "unet", "config.json", NULL);
      char *base = g_file_test (sub, G_FILE_TEST_IS_REGULAR)
                   ? g_build_filename (path, "unet", NULL) : g_strdup (path);
      char *weights = g_build_filename (base, "diffusion_pytorch_model"
                                        ".safetensors", NULL);

      config = g_build_filename (base, "config.json", NULL);
      if (!g_file_test (config, G_FILE_TEST_IS_REGULAR)
          || !g_file_test (weights, G_FILE_TEST_IS_REGULAR))
        g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                     "%s: the folder has no config.json and "
                     "diffusion_pytorch_model.safetensors; give a diffusers "
                     "UNet folder or a .safetensors file", path);
      else
        m = load_diffusers (weights, config, error);
      g_free (sub);
      g_free (base);
      g_free (weights);
      g_free (config);
      goto out;
    }

  /* A file: ours, or a diffusers one with config.json beside it. */
  st = df_safetensors_open (path, error);
  if (st == NULL)
    return NULL;
  format = df_safetensors_get_metadata (st, "format");
  dir = g_path_get_dirname (path);
  config = g_build_filename (dir, "config.json", NULL);
  if (g_strcmp0 (format, "diffuse") == 0)
    m = load_engine (st, error);
  else if (format == NULL && g_file_test (config, G_FILE_TEST_IS_REGULAR))
    {
      df_safetensors_free (st);
      st = NULL;
      m = load_diffusers (path, config, error);
    }
  else if (format == NULL)
    g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                 "%s is not a diffuse model: it has no \"format\": "
                 "\"diffuse\" metadata and no config.json beside it; put "
                 "the diffusers config.json in the same folder, or give "
                 "the diffusers folder", path);
  else
    g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                 "%s is not a diffuse model: its format is \"%s\"; give a "
                 "file written by diffuse or a diffusers UNet folder", path,
                 format);
  df_safetensors_free (st);
  g_free (dir);
  g_free (config);

out:
  if (m != NULL)
    m->path = g_strdup (path);
  return m;
}

char **
df_model_metadata (DfModel *m)
{
  JsonBuilder *b;
  JsonNode *node;
  char **meta = g_new0 (char *, 15);
  int k = 0;

  g_return_val_if_fail (m != NULL, NULL);

  meta[k++] = g_strdup ("format");
  meta[k++] = g_strdup ("diffuse");
  meta[k++] = g_strdup ("format_version");
  meta[k++] = g_strdup (DF_FORMAT_VERSION);
  meta[k++] = g_strdup ("kind");
  meta[k++] = g_strdup (m->classifier ? "classifier" : "unet");
  node = df_unet_config_to_json (df_unet_config (m->net));
  meta[k++] = g_strdup ("config");
  meta[k++] = json_to_string (node, FALSE);
  json_node_unref (node);
  node = schedule_to_json (m->schedule);
  meta[k++] = g_strdup ("schedule");
  meta[k++] = json_to_string (node, FALSE);
  json_node_unref (node);
  b = json_builder_new ();
  json_builder_begin_array (b);
  for (int i = 0; i < m->num_classes; i++)
    json_builder_add_string_value (b, m->class_names[i]);
  json_builder_end_array (b);
  node = json_builder_get_root (b);
  g_object_unref (b);
  meta[k++] = g_strdup ("class_names");
  meta[k++] = json_to_string (node, FALSE);
  json_node_unref (node);
  meta[k++] = g_strdup ("uncond_class");
  meta[k++] = g_strdup_printf ("%d", m->uncond_class);
  meta[k] = NULL;
  return meta;
}

gboolean
df_model_save (DfModel *m, const char *path, GError **error)
{
  const DfParam *params;
  DfSafetensorsEntry *entries;
  char **meta;
  int n_params;
  gboolean ok;

  g_return_val_if_fail (m != NULL && path != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  meta = df_model_metadata (m);

  /* The parameters under diffusers' names. */
  params = df_unet_params (m->net, &n_params);
  entries = g_new0 (DfSafetensorsEntry, n_params);
  for (int i = 0; i < n_params; i++)
    {
      entries[i].name = params[i].name;
      entries[i].ndim = params[i].tensor->ndim;
      for (int d = 0; d < params[i].tensor->ndim; d++)
        entries[i].shape[d] = params[i].tensor->shape[d];
      entries[i].data = params[i].tensor->data;
    }
  ok = df_safetensors_write (path, (const char *const *) meta, entries,
                             n_params, error);
  if (ok)
    {
      g_free (m->path);
      m->path = g_strdup (path);
    }
  g_free (entries);
  g_strfreev (meta);
  return ok;
}

/* ---- accessors ---- */

DfUNet *
df_model_net (DfModel *m)
{
  g_return_val_if_fail (m != NULL, NULL);
  return m->net;
}

const DfSchedule *
df_model_schedule (DfModel *m)
{
  g_return_val_if_fail (m != NULL, NULL);
  return m->schedule;
}

gboolean
df_model_is_classifier (DfModel *m)
{
  g_return_val_if_fail (m != NULL, FALSE);
  return m->classifier;
}

int
df_model_channels (DfModel *m)
{
  g_return_val_if_fail (m != NULL, 0);
  return df_unet_config (m->net)->in_channels;
}

int
df_model_size (DfModel *m)
{
  g_return_val_if_fail (m != NULL, 0);
  return df_unet_config (m->net)->sample_size;
}

int
df_model_num_classes (DfModel *m)
{
  g_return_val_if_fail (m != NULL, 0);
  return m->num_classes;
}

const char *
df_model_class_name (DfModel *m, int label)
{
  g_return_val_if_fail (m != NULL, NULL);
  if (label < 0 || label >= m->num_classes)
    return NULL;
  return m->class_names[label];
}

int
df_model_class_lookup (DfModel *m, const char *name_or_index)
{
  gint64 v;

  g_return_val_if_fail (m != NULL, -1);
  if (name_or_index == NULL)
    return -1;
  for (int i = 0; i < m->num_classes; i++)
    if (strcmp (m->class_names[i], name_or_index) == 0)
      return i;
  for (int i = 0; i < m->num_classes; i++)
    if (g_ascii_strcasecmp (m->class_names[i], name_or_index) == 0)
      return i;
  if (g_ascii_string_to_signed (name_or_index, 10, 0, G_MAXINT, &v, NULL)
      && v < MAX (m->num_classes, embed_classes (m)))
    return (int) v;
  return -1;
}

int
df_model_uncond_class (DfModel *m)
{
  g_return_val_if_fail (m != NULL, -1);
  return m->uncond_class;
}

const char *
df_model_path (DfModel *m)
{
  g_return_val_if_fail (m != NULL, NULL);
  return m->path;
}

void
df_set_threads (int n)
{
  if (n <= 0)
    n = omp_get_num_procs ();
  n = MIN (n, DF_MAX_THREADS);
  omp_set_num_threads (n);
  df_blas_set_threads (n);
}

int
df_get_threads (void)
{
  return omp_get_max_threads ();
}

/* ---- forward passes ---- */

/* The timesteps as floats (and labels when the caller gave none) for n
 * samples; call with m->lock held. */
static void
fill_inputs (DfModel *m, int n, int t, int label)
{
  if (n > m->tbuf_len)
    {
      m->tbuf = g_renew (float, m->tbuf, n);
      m->lbuf = g_renew (int, m->lbuf, n);
      m->tbuf_len = n;
    }
  for (int i = 0; i < n; i++)
    {
      m->tbuf[i] = (float) t;
      m->lbuf[i] = label;
    }
}

static gboolean
check_inputs (DfModel *m, int n, int t, const int *labels, GError **error)
{
  int embeds = embed_classes (m);

  if (t < 0 || t >= m->schedule->T)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                   "timestep %d is outside the model's 0..%d", t,
                   m->schedule->T - 1);
      return FALSE;
    }
  if (embeds > 0 && labels == NULL && m->uncond_class < 0)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                   "%s is class-conditional without an unconditional class: "
                   "choose a label", m->path ? m->path : "the model");
      return FALSE;
    }
  for (int i = 0; labels != NULL && embeds > 0 && i < n; i++)
    if (labels[i] < 0 || labels[i] >= embeds)
      {
        g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                     "label %d is not a class of the model (0..%d)",
                     labels[i], embeds - 1);
        return FALSE;
      }
  return TRUE;
}

/* x[N,C,H,W] into a fresh pass of g, as its input tensor. */
static DfTensor *
input_tensor (DfModel *m, DfGraph *g, const float *x, int n)
{
  int c = df_model_channels (m), s = df_model_size (m);
  DfTensor *xt;

  df_graph_reset (g);
  xt = df_graph_tensor_4d (g, n, c, s, s);
  memcpy (xt->data, x, xt->size * sizeof (float));
  return xt;
}

/* A NaN in the weights or the input turns every later value into NaN: say
 * so instead of writing black images. */
static gboolean
output_finite (DfModel *m, const float *v, gsize n, GError **error)
{
  for (gsize i = 0; i < n; i++)
    if (!isfinite (v[i]))
      {
        g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                     "%s: the network's output is not finite (NaN or "
                     "infinity): the weights or the input hold such values",
                     m->path ? m->path : "model");
        return FALSE;
      }
  return TRUE;
}

gboolean
df_model_eps (DfModel *m, const float *x, int n, int t, const int *labels,
              float *eps, GError **error)
{
  DfTensor *xt, *y;
  const int *lab = labels;
  gsize len = 0;

  g_return_val_if_fail (m != NULL && !m->classifier, FALSE);
  g_return_val_if_fail (x != NULL && eps != NULL && n >= 1, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (!check_inputs (m, n, t, labels, error))
    return FALSE;

  g_mutex_lock (&m->lock);
  if (m->graph == NULL)
    m->graph = df_graph_new (FALSE);
  fill_inputs (m, n, t, m->uncond_class);
  if (embed_classes (m) > 0 && labels == NULL)
    lab = m->lbuf;
  else if (embed_classes (m) == 0)
    lab = NULL;

  /* eps [N,C,H,W]. */
  xt = input_tensor (m, m->graph, x, n);
  y = df_unet_forward (m->net, m->graph, xt, m->tbuf, lab);
  if (y != NULL)
    {
      len = y->size;
      memcpy (eps, y->data, len * sizeof (float));
    }
  g_mutex_unlock (&m->lock);

  if (y == NULL)
    g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                 "the network rejected its input (see the log)");
  else if (!output_finite (m, eps, len, error))
    return FALSE;
  return y != NULL;
}

gboolean
df_model_logits (DfModel *m, const float *x, int n, int t, float *logits,
                 GError **error)
{
  DfTensor *xt, *y;

  g_return_val_if_fail (m != NULL && m->classifier, FALSE);
  g_return_val_if_fail (x != NULL && logits != NULL && n >= 1, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (!check_inputs (m, n, t, NULL, error))
    return FALSE;

  g_mutex_lock (&m->lock);
  if (m->graph == NULL)
    m->graph = df_graph_new (FALSE);
  fill_inputs (m, n, t, -1);

  /* logits [N,K]. */
  xt = input_tensor (m, m->graph, x, n);
  y = df_unet_forward (m->net, m->graph, xt, m->tbuf, NULL);
  if (y != NULL)
    memcpy (logits, y->data, y->size * sizeof (float));
  g_mutex_unlock (&m->lock);

  if (y == NULL)
    g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                 "the classifier rejected its input (see the log)");
  return y != NULL;
}

gboolean
df_model_class_grad (gpointer data, const float *x, int n, int t,
                     const int *labels, float *grad, GError **error)
{
  DfModel *m = data;
  int k;
  DfTensor *xt, *logits;

  g_return_val_if_fail (m != NULL && m->classifier, FALSE);
  g_return_val_if_fail (x != NULL && labels != NULL && grad != NULL, FALSE);
  g_return_val_if_fail (n >= 1, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  k = df_unet_config (m->net)->classifier_classes;
  if (!check_inputs (m, n, t, NULL, error))
    return FALSE;
  for (int i = 0; i < n; i++)
    if (labels[i] < 0 || labels[i] >= k)
      {
        g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                     "label %d is not a class of the classifier (0..%d)",
                     labels[i], k - 1);
        return FALSE;
      }

  g_mutex_lock (&m->lock);
  if (m->grad_graph == NULL)
    m->grad_graph = df_graph_new (TRUE);
  fill_inputs (m, n, t, -1);

  /* Forward with x needing a gradient, then back from log p(y | x). */
  xt = input_tensor (m, m->grad_graph, x, n);
  df_tensor_require_grad (xt);
  logits = df_unet_forward (m->net, m->grad_graph, xt, m->tbuf, NULL);
  if (logits != NULL)
    {
      df_seed_log_prob (m->grad_graph, logits, labels);
      df_graph_backward (m->grad_graph);
      memcpy (grad, df_tensor_grad (xt), xt->size * sizeof (float));
    }
  g_mutex_unlock (&m->lock);

  if (logits == NULL)
    g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                 "the classifier rejected its input (see the log)");
  return logits != NULL;
}

static gboolean
model_eps_cb (gpointer data, const float *x, int n, int t, const int *labels,
              float *eps, GError **error)
{
  return df_model_eps (data, x, n, t, labels, eps, error);
}

/* ---- jobs ---- */

/* Progress over several batches: step numbers continue across them. */
typedef struct {
  DfProgressFunc func;
  gpointer       data;
  int            done;       /* steps of the batches before this one */
  int            total;      /* batches x steps */
} Progress;

static void
progress_cb (gpointer data, int step, int total, const float *x0, int n)
{
  Progress *pr = data;

  pr->func (pr->data, pr->done + step, pr->total, x0, n);
}

static gboolean
setup_denoiser (DfModel *m, DfModel *classifier, const DfSampleParams *p,
                DfDenoiser *d, GError **error)
{
  const char *name = m->path ? m->path : "the model";

  if (m->classifier)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                   "%s is a classifier, not a UNet: give a UNet to sample "
                   "from, and the classifier for guidance", name);
      return FALSE;
    }
  memset (d, 0, sizeof *d);
  d->channels = df_model_channels (m);
  d->height = d->width = df_model_size (m);
  d->num_classes = embed_classes (m);
  d->uncond_label = m->uncond_class;
  d->eps = model_eps_cb;
  d->eps_data = m;

  /* Classifier guidance needs a classifier that sees the same x_t. */
  if (p->guidance == DF_GUIDANCE_CLASSIFIER && classifier != NULL)
    {
      const char *cname = classifier->path ? classifier->path
                                           : "the classifier";

      if (!classifier->classifier)
        {
          g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                       "%s is a UNet, not a classifier: give a classifier "
                       "model for classifier guidance", cname);
          return FALSE;
        }
      if (df_model_size (classifier) != d->height
          || df_model_channels (classifier) != d->channels)
        {
          g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                       "%s takes %dx%d images of %d channels but %s makes "
                       "%dx%d of %d: use a classifier trained on the same "
                       "data", cname, df_model_size (classifier),
                       df_model_size (classifier),
                       df_model_channels (classifier), name, d->height,
                       d->width, d->channels);
          return FALSE;
        }
      if (classifier->schedule->T != m->schedule->T)
        {
          g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                       "%s was trained with %d timesteps but %s with %d: "
                       "use a classifier trained with the UNet's schedule",
                       cname, classifier->schedule->T, name, m->schedule->T);
          return FALSE;
        }
      if (p->label >= df_unet_config (classifier->net)->classifier_classes)
        {
          g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                       "label %d: the classifier %s has %d classes", p->label,
                       cname,
                       df_unet_config (classifier->net)->classifier_classes);
          return FALSE;
        }
      d->class_grad = df_model_class_grad;
      d->grad_data = classifier;
    }
  return df_sample_params_check (p, m->schedule, d, error);
}

static gboolean
check_counts (int count, const char *what, int batch, GError **error)
{
  if (count < 1)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                   "%d %s: give at least one", count, what);
      return FALSE;
    }
  if (batch < 1)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                   "batch size %d: it must be at least 1", batch);
      return FALSE;
    }
  return TRUE;
}

gboolean
df_model_generate (DfModel *m, DfModel *classifier, const DfSampleParams *p,
                   int count, int batch, float *out,
                   DfProgressFunc progress, gpointer data,
                   GCancellable *cancellable, GError **error)
{
  DfDenoiser d;
  Progress pr;
  gsize P;

  g_return_val_if_fail (m != NULL && p != NULL && out != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (!check_counts (count, "samples", batch, error)
      || !setup_denoiser (m, classifier, p, &d, error))
    return FALSE;
  P = (gsize) d.channels * d.height * d.width;
  batch = MIN (batch, count);

  /* Batches of indices first..first+n-1: each sample's noise is keyed by
   * its index, so the batch size changes nothing. */
  pr.func = progress;
  pr.data = data;
  pr.total = (count + batch - 1) / batch * p->steps;
  for (int first = 0; first < count; first += batch)
    {
      int n = MIN (batch, count - first);

      pr.done = first / batch * p->steps;
      if (!df_sample (m->schedule, &d, p, first, n, NULL, out + first * P,
                      progress ? progress_cb : NULL, &pr, cancellable,
                      error))
        return FALSE;
    }
  return TRUE;
}

gboolean
df_model_interpolate (DfModel *m, const DfSampleParams *p, guint64 seed_a,
                      guint64 seed_b, int frames, int batch, float *out,
                      DfProgressFunc progress, gpointer data,
                      GCancellable *cancellable, GError **error)
{
  DfSampleParams q;
  DfDenoiser d;
  Progress pr;
  float *xa, *xb, *xT;
  gsize P;
  gboolean ok = TRUE;

  g_return_val_if_fail (m != NULL && p != NULL && out != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  /* Deterministic decoding: DDIM at eta 0. */
  q = *p;
  q.sampler = DF_SAMPLER_DDIM;
  q.eta = 0.0;
  if (!check_counts (frames, "frames", batch, error)
      || !setup_denoiser (m, NULL, &q, &d, error))
    return FALSE;
  P = (gsize) d.channels * d.height * d.width;
  batch = MIN (batch, frames);

  /* x_T of both seeds: sample index 0, as df_model_generate draws it. */
  xa = g_new (float, P);
  xb = g_new (float, P);
  xT = g_new (float, (gsize) batch * P);           /* [batch,C,H,W] */
  df_sample_initial_noise (seed_a, 0, (int) P, xa);
  df_sample_initial_noise (seed_b, 0, (int) P, xb);

  pr.func = progress;
  pr.data = data;
  pr.total = (frames + batch - 1) / batch * q.steps;
  for (int first = 0; ok && first < frames; first += batch)
    {
      int n = MIN (batch, frames - first);

      for (int i = 0; i < n; i++)
        {
          int f = first + i;
          double a = frames > 1 ? (double) f / (frames - 1) : 0.0;

          df_slerp (xa, xb, P, a, xT + i * P);
        }
      pr.done = first / batch * q.steps;
      ok = df_sample (m->schedule, &d, &q, first, n, xT, out + first * P,
                      progress ? progress_cb : NULL, &pr, cancellable, error);
    }
  g_free (xa);
  g_free (xb);
  g_free (xT);
  return ok;
}

/* ---- classes shared between models ---- */

/* A file saved without class names gets "0", "1", ...: those say no more
 * than the count. */
static gboolean
names_are_indices (int n, const char *const *names)
{
  if (names == NULL)
    return TRUE;
  for (int i = 0; i < n; i++)
    {
      char index[16];

      g_snprintf (index, sizeof index, "%d", i);
      if (names[i] == NULL || strcmp (names[i], index) != 0)
        return FALSE;
    }
  return TRUE;
}

static char *
join_names (int n, const char *const *names)
{
  GString *s = g_string_new (NULL);

  for (int i = 0; i < n; i++)
    g_string_append_printf (s, "%s%s", i ? ", " : "",
                            names && names[i] ? names[i] : "?");
  return g_string_free (s, FALSE);
}

/* See model.h. */
gboolean
df_model_check_classes (DfModel *m, const char *what, int n,
                   const char *const *names, GError **error)
{
  int k = df_model_num_classes (m);
  const char **own = g_new0 (const char *, k + 1);
  gboolean same = n == k;
  char *theirs, *ours;

  for (int i = 0; i < k; i++)
    own[i] = df_model_class_name (m, i);
  if (same && !names_are_indices (n, names) && !names_are_indices (k, own))
    for (int i = 0; i < k && same; i++)
      same = names[i] != NULL && strcmp (names[i], own[i]) == 0;
  if (same)
    {
      g_free (own);
      return TRUE;
    }

  theirs = join_names (n, names);
  ours = join_names (k, own);
  if (n != k)
    g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                 "%s has %d class%s (%s); the model %s has %d (%s)", what, n,
                 n == 1 ? "" : "es", theirs, df_model_path (m), k, ours);
  else
    g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                 "%s has classes %s; the model %s has %s", what, theirs,
                 df_model_path (m), ours);
  g_free (theirs);
  g_free (ours);
  g_free (own);
  return FALSE;
}

gboolean
df_model_check_classifier (DfModel *m, DfModel *classifier, const char *what,
                           GError **error)
{
  int n = df_model_num_classes (classifier);
  const char **names = g_new0 (const char *, n + 1);
  char *who = g_strdup_printf ("%s %s", what, df_model_path (classifier));
  gboolean ok;

  for (int i = 0; i < n; i++)
    names[i] = df_model_class_name (classifier, i);
  ok = df_model_check_classes (m, who, n, names, error);
  g_free (who);
  g_free (names);
  return ok;
}
