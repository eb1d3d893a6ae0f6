/* job.c: settings -> engine call -> float images, and how results are
 * named and described.  Shared by the plug-in and the dialog. */
#include "job.h"

#include <json-glib/json-glib.h>
#include <math.h>
#include <string.h>

/* Samples denoised together: bounds memory for large counts; results do
 * not depend on it (the engine is batch-invariant). */
#define MAX_BATCH 16

static gboolean
calling_error (GError **error, const char *fmt, ...) G_GNUC_PRINTF (2, 3);

static gboolean
calling_error (GError **error, const char *fmt, ...)
{
  va_list args;
  char *msg;

  va_start (args, fmt);
  msg = g_strdup_vprintf (fmt, args);
  va_end (args);
  g_set_error_literal (error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CALLING, msg);
  g_free (msg);
  return FALSE;
}

static gint32
draw_seed (void)
{
  return g_random_int_range (0, G_MAXINT32);
}

/* Loads path as a model of the wanted kind; a missing file is the caller's
 * mistake, a file the engine rejects is reported with the engine's words. */
static DfModel *
load_model (const char *path, gboolean want_classifier, GError **error)
{
  const char *what = want_classifier ? "classifier" : "model";
  GError *local = NULL;
  DfModel *m;

  if (!g_file_test (path, G_FILE_TEST_EXISTS))
    {
      calling_error (error, "%s file '%s' does not exist: give an engine "
                     ".safetensors file, a diffusers folder, or \"\" for the "
                     "shipped %s (in %s)", what, path, what, df_weights_dir ());
      return NULL;
    }

  m = df_model_load (path, &local);
  if (m == NULL)
    {
      g_set_error (error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_EXECUTION,
                   "cannot load %s '%s': %s", what, path, local->message);
      g_error_free (local);
      return NULL;
    }
  if (df_model_is_classifier (m) != want_classifier)
    {
      calling_error (error, "'%s' is a %s, not a %s: choose a %s file",
                     path, want_classifier ? "UNet" : "classifier", what,
                     what);
      df_model_free (m);
      return NULL;
    }
  return m;
}

/* The checks that need the loaded model(s). */
static void fill_sample_params (const DfJob *job, DfSampleParams *sp);

static gboolean
check_against_model (DfJob *job, GError **error)
{
  const DfPluginParams *p = &job->params;
  int T = df_model_schedule (job->model)->T;
  int k = df_model_num_classes (job->model);

  if (p->steps > T)
    return calling_error (error, "steps %d is more than the %d timesteps "
                          "model '%s' was trained with: use 1..%d",
                          p->steps, T, job->model_path, T);
  if (job->channels != 1 && job->channels != 3)
    return calling_error (error, "model '%s' makes %d-channel images; only "
                          "1 (gray) and 3 (RGB) are supported",
                          job->model_path, job->channels);

  if (p->class_label >= 0 && p->class_label >= k)
    {
      if (k == 0)
        return calling_error (error, "class %d: model '%s' is unconditional "
                              "(it has no classes); use class -1",
                              p->class_label, job->model_path);
      return calling_error (error, "class %d is out of range: model '%s' "
                            "has classes 0..%d", p->class_label,
                            job->model_path, k - 1);
    }
  if (p->kind != DF_PROC_CLASS_GUIDED)
    return TRUE;

  /* A scale that the default interval leaves no step to act on (1 or 2
   * steps) would be named in the layer but not applied. */
  if (p->guidance == 0 && p->scale != 0.0 && p->scale != 1.0)
    {
      DfSampleParams sp;

      fill_sample_params (job, &sp);
      if (df_sample_guided_steps (df_model_schedule (job->model), &sp) == 0)
        return calling_error (error, "guidance scale %g has no effect at %d "
                              "step%s: none has a noise level in the "
                              "guidance interval (" DF_FREE_GUIDE_TEXT "]; "
                              "use more steps", p->scale, p->steps,
                              p->steps == 1 ? "" : "s");
    }

  if (p->guidance == 0 && df_model_uncond_class (job->model) < 0)
    return calling_error (error, "model '%s' has no unconditional class, "
                          "so classifier-free guidance cannot work: use "
                          "guidance 1 (classifier)", job->model_path);
  if (p->guidance == 1)
    {
      GError *err = NULL;

      if (!df_model_check_classifier (job->model, job->classifier,
                                      "the classifier", &err))
        {
          calling_error (error, "%s", err->message);
          g_error_free (err);
          return FALSE;
        }
    }
  return TRUE;
}

DfJob *
df_job_new (const DfPluginParams *p, GError **error)
{
  DfJob *job;

  g_return_val_if_fail (p != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  if (!df_plugin_params_check (p, error))
    return NULL;

  job = g_new0 (DfJob, 1);
  job->params = *p;

  /* Resolve what "" and -1 stand for, so names and parasites say what ran. */
  job->model_path = df_resolve_model_path (p->model, FALSE);
  df_plugin_params_set_path (job->params.model, job->model_path);
  if (job->params.seed < 0)
    job->params.seed = draw_seed ();
  if (p->kind == DF_PROC_INTERPOLATE)
    {
      if (job->params.seed_b < 0)
        job->params.seed_b = draw_seed ();
      job->params.sampler = 0;
      job->params.eta = 0.0;
    }

  job->model = load_model (job->model_path, FALSE, error);
  if (job->model == NULL)
    goto fail;
  job->channels = df_model_channels (job->model);
  job->height = job->width = df_model_size (job->model);
  job->n = p->kind == DF_PROC_INTERPOLATE ? p->frames : p->count;

  if (p->kind == DF_PROC_CLASS_GUIDED && p->guidance == 1)
    {
      job->classifier_path = df_resolve_model_path (p->classifier, TRUE);
      df_plugin_params_set_path (job->params.classifier,
                                 job->classifier_path);
      job->classifier = load_model (job->classifier_path, TRUE, error);
      if (job->classifier == NULL)
        goto fail;
    }

  if (!check_against_model (job, error))
    goto fail;
  return job;

fail:
  df_job_free (job);
  return NULL;
}

void
df_job_free (DfJob *job)
{
  if (job == NULL)
    return;
  g_clear_pointer (&job->model, df_model_free);
  g_clear_pointer (&job->classifier, df_model_free);
  g_free (job->model_path);
  g_free (job->classifier_path);
  g_free (job->images);
  g_free (job);
}

/* The engine reports steps per batch; this turns them into the fraction of
 * the whole job. */
typedef struct {
  DfJob        *job;
  DfJobProgress progress;
  gpointer      data;
  int           n_batches;
  int           batch;
  int           last_step;
} ProgressRelay;

static void
relay_progress (gpointer user_data, int step, int total, const float *x0,
                int n)
{
  ProgressRelay *r = user_data;
  double fraction;

  if (r->progress == NULL)
    return;
  if (step < r->last_step)
    r->batch++;
  r->last_step = step;

  fraction = (r->batch + (total > 0 ? (double) step / total : 0.0))
             / r->n_batches;
  r->progress (r->data, CLAMP (fraction, 0.0, 1.0), x0, r->job->channels,
               r->job->height, r->job->width);
}

static void
fill_sample_params (const DfJob *job, DfSampleParams *sp)
{
  const DfPluginParams *p = &job->params;
  int uncond = df_model_uncond_class (job->model);

  df_sample_params_init (sp);
  sp->sampler = p->sampler == 1 ? DF_SAMPLER_DDPM : DF_SAMPLER_DDIM;
  sp->steps = p->steps;
  sp->eta = p->eta;
  sp->seed = (guint64) p->seed;
  sp->label = p->class_label;

  /* "No class" on a class-conditional model is its unconditional class. */
  if (sp->label < 0 && uncond >= 0)
    sp->label = uncond;

  /* Interpolation towards a class guides as the CLI's does: free, at the
   * scale of the parameters (3: the procedure has no scale argument) and
   * the default interval, when the model has an unconditional class. */
  if (p->kind == DF_PROC_INTERPOLATE && p->class_label >= 0 && uncond >= 0)
    {
      sp->guidance = DF_GUIDANCE_FREE;
      sp->scale = p->scale;
      sp->guide_lo = DF_FREE_GUIDE_LO;
      sp->guide_hi = DF_FREE_GUIDE_HI;
      /* At 1 or 2 steps no step is in the interval: plain conditional
       * frames, and the parasite says so. */
      if (df_sample_guided_steps (df_model_schedule (job->model), sp) == 0)
        sp->guidance = DF_GUIDANCE_NONE;
    }

  if (p->kind == DF_PROC_CLASS_GUIDED)
    {
      sp->guidance = p->guidance == 1 ? DF_GUIDANCE_CLASSIFIER
                                      : DF_GUIDANCE_FREE;
      sp->scale = p->scale;
      if (sp->guidance == DF_GUIDANCE_FREE && sp->scale != 0.0)
        {
          sp->guide_lo = DF_FREE_GUIDE_LO;
          sp->guide_hi = DF_FREE_GUIDE_HI;
        }
    }
}

gboolean
df_job_run (DfJob *job, DfJobProgress progress, gpointer data,
            GCancellable *cancellable, GError **error)
{
  gsize sample = (gsize) job->channels * job->height * job->width;
  int batch = MIN (job->n, MAX_BATCH);
  ProgressRelay relay = { job, progress, data,
                          (job->n + batch - 1) / batch, 0, -1 };
  DfSampleParams sp;
  GError *local = NULL;
  float *out;         /* [n,C,H,W] */
  gint64 start;
  gboolean ok;

  g_return_val_if_fail (job != NULL && job->images == NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  fill_sample_params (job, &sp);
  out = g_new (float, sample * job->n);

  start = g_get_monotonic_time ();
  if (job->params.kind == DF_PROC_INTERPOLATE)
    ok = df_model_interpolate (job->model, &sp,
                               (guint64) job->params.seed,
                               (guint64) job->params.seed_b, job->n, batch,
                               out, relay_progress, &relay, cancellable,
                               &local);
  else
    ok = df_model_generate (job->model, job->classifier, &sp, job->n, batch,
                            out, relay_progress, &relay, cancellable,
                            &local);
  job->seconds = (g_get_monotonic_time () - start) / 1e6;

  /* A cancel may surface as the engine's own error or only through the
   * cancellable; either way it is a cancel, not a failure. */
  if (!ok || g_cancellable_is_cancelled (cancellable))
    {
      g_free (out);
      if (g_cancellable_is_cancelled (cancellable)
          || g_error_matches (local, DF_SAMPLER_ERROR,
                              DF_SAMPLER_ERROR_CANCELLED)
          || g_error_matches (local, G_IO_ERROR, G_IO_ERROR_CANCELLED))
        g_set_error_literal (error, DF_PLUGIN_ERROR,
                             DF_PLUGIN_ERROR_CANCELLED, "cancelled");
      else if (g_error_matches (local, DF_SAMPLER_ERROR,
                                DF_SAMPLER_ERROR_INVALID)
               || g_error_matches (local, DF_MODEL_ERROR,
                                   DF_MODEL_ERROR_INVALID))
        g_set_error_literal (error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CALLING,
                             local->message);
      else
        g_set_error (error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_EXECUTION,
                     "the engine failed: %s",
                     local != NULL ? local->message : "no reason given");
      g_clear_error (&local);
      return FALSE;
    }

  job->images = out;
  if (progress != NULL)
    progress (data, 1.0, NULL, job->channels, job->height, job->width);
  return TRUE;
}

static const char *
class_name (const DfJob *job)
{
  const char *name;

  if (job->params.class_label < 0)
    return NULL;
  name = df_model_class_name (job->model, job->params.class_label);
  return name != NULL && name[0] != '\0' ? name : NULL;
}

char *
df_job_layer_name (const DfJob *job, int i)
{
  const DfPluginParams *p = &job->params;
  GString *s = g_string_new ("Diffusion: ");
  const char *cls = class_name (job);

  g_return_val_if_fail (i >= 0 && i < job->n, NULL);

  if (cls != NULL)
    g_string_append_printf (s, "%s, ", cls);
  else if (p->class_label >= 0)
    g_string_append_printf (s, "class %d, ", p->class_label);

  if (p->kind == DF_PROC_INTERPOLATE)
    {
      g_string_append_printf (s, "seeds %d-%d frame %d/%d, DDIM %d (100ms)",
                              p->seed, p->seed_b, i + 1, job->n, p->steps);
      return g_string_free (s, FALSE);
    }

  g_string_append_printf (s, "seed %d", p->seed);
  if (job->n > 1)
    g_string_append_printf (s, " #%d", i + 1);
  if (p->sampler == 1)
    g_string_append_printf (s, ", DDPM %d", p->steps);
  else
    g_string_append_printf (s, ", DDIM %d, eta %.1f", p->steps, p->eta);
  if (p->kind == DF_PROC_CLASS_GUIDED)
    g_string_append_printf (s, ", %s %.1f",
                            p->guidance == 1 ? "classifier guidance"
                                             : "guidance", p->scale);
  return g_string_free (s, FALSE);
}

char *
df_job_params_json (const DfJob *job, int i)
{
  const DfPluginParams *p = &job->params;
  JsonBuilder *b = json_builder_new ();
  DfSampleParams sp;
  JsonNode *root;
  char *text;

  g_return_val_if_fail (i >= 0 && i < job->n, NULL);

  json_builder_begin_object (b);
  json_builder_set_member_name (b, "procedure");
  json_builder_add_string_value (b, df_proc_name (p->kind));
  json_builder_set_member_name (b, "model");
  json_builder_add_string_value (b, job->model_path);
  json_builder_set_member_name (b, "sampler");
  json_builder_add_string_value (b, p->sampler == 1 ? "ddpm" : "ddim");
  json_builder_set_member_name (b, "steps");
  json_builder_add_int_value (b, p->steps);
  json_builder_set_member_name (b, "eta");
  json_builder_add_double_value (b, p->eta);
  json_builder_set_member_name (b, "class");
  json_builder_add_int_value (b, p->class_label);
  if (class_name (job) != NULL)
    {
      json_builder_set_member_name (b, "class_name");
      json_builder_add_string_value (b, class_name (job));
    }

  if (p->kind == DF_PROC_INTERPOLATE)
    {
      json_builder_set_member_name (b, "seed_a");
      json_builder_add_int_value (b, p->seed);
      json_builder_set_member_name (b, "seed_b");
      json_builder_add_int_value (b, p->seed_b);
      json_builder_set_member_name (b, "frames");
      json_builder_add_int_value (b, p->frames);
      json_builder_set_member_name (b, "frame");
      json_builder_add_int_value (b, i);
    }
  else
    {
      json_builder_set_member_name (b, "seed");
      json_builder_add_int_value (b, p->seed);
      json_builder_set_member_name (b, "index");
      json_builder_add_int_value (b, i);
      json_builder_set_member_name (b, "count");
      json_builder_add_int_value (b, p->count);
    }

  /* The guidance as sampled (see fill_sample_params). */
  fill_sample_params (job, &sp);
  if (sp.guidance != DF_GUIDANCE_NONE)
    {
      json_builder_set_member_name (b, "guidance");
      json_builder_add_string_value (b, sp.guidance == DF_GUIDANCE_CLASSIFIER
                                        ? "classifier" : "free");
      json_builder_set_member_name (b, "scale");
      json_builder_add_double_value (b, sp.scale);
      /* Only a limited interval (JSON has no infinity). */
      if (sp.guidance == DF_GUIDANCE_FREE && !isinf (sp.guide_hi))
        {
          json_builder_set_member_name (b, "guidance_interval");
          json_builder_begin_array (b);
          json_builder_add_double_value (b, sp.guide_lo);
          json_builder_add_double_value (b, sp.guide_hi);
          json_builder_end_array (b);
        }
      if (job->classifier_path != NULL)
        {
          json_builder_set_member_name (b, "classifier");
          json_builder_add_string_value (b, job->classifier_path);
        }
    }
  json_builder_end_object (b);

  root = json_builder_get_root (b);
  text = json_to_string (root, FALSE);
  json_node_unref (root);
  g_object_unref (b);
  return text;
}

guint8
df_float_to_u8 (float x)
{
  float v = (x + 1.0f) * 0.5f * 255.0f;

  if (!(v > 0.0f))          /* NaN too */
    return 0;
  if (v >= 255.0f)
    return 255;
  return (guint8) lrintf (v);
}

void
df_job_result_pixels (const DfJob *job, int i, gboolean rgb, gboolean alpha,
                      guint8 *out)
{
  gsize plane = (gsize) job->height * job->width;
  const float *img;       /* [C,H,W] */
  int bpp = (rgb ? 3 : 1) + (alpha ? 1 : 0);

  g_return_if_fail (job->images != NULL && i >= 0 && i < job->n);
  img = job->images + (gsize) i * job->channels * plane;

  for (gsize k = 0; k < plane; k++)
    {
      guint8 *px = out + k * bpp;

      if (job->channels == 1)
        {
          guint8 v = df_float_to_u8 (img[k]);

          px[0] = v;
          if (rgb)
            px[1] = px[2] = v;
        }
      else if (rgb)
        {
          px[0] = df_float_to_u8 (img[k]);
          px[1] = df_float_to_u8 (img[plane + k]);
          px[2] = df_float_to_u8 (img[2 * plane + k]);
        }
      else
        {
          /* Rec. 601 luma of the RGB output. */
          px[0] = df_float_to_u8 (0.299f * img[k] + 0.587f * img[plane + k]
                                  + 0.114f * img[2 * plane + k]);
        }
      if (alpha)
        px[bpp - 1] = 255;
    }
}
