/* params.c: defaults, range checks and path resolution for the plug-in's
 * settings.  No GIMP and no GTK here: the tests use it directly. */
#include "params.h"

#include <math.h>
#include <string.h>

#ifndef DF_WEIGHTS_DIR
#define DF_WEIGHTS_DIR "/usr/local/share/diffuse/weights"
#endif

#define DEFAULT_MODEL      "fashion-mnist.safetensors"
#define DEFAULT_CLASSIFIER "fashion-mnist-classifier.safetensors"

G_DEFINE_QUARK (df-plugin-error-quark, df_plugin_error)

static const char *const proc_names[DF_N_PROCS] = {
  "plug-in-diffusion-generate",
  "plug-in-diffusion-interpolate",
  "plug-in-diffusion-class-guided",
};

void
df_plugin_params_init (DfPluginParams *p, DfProcKind kind)
{
  g_return_if_fail (p != NULL);

  memset (p, 0, sizeof *p);
  p->kind = kind;
  p->count = 1;
  p->steps = 50;
  p->eta = 0.0;
  p->seed = -1;
  p->sampler = 0;
  p->class_label = kind == DF_PROC_CLASS_GUIDED ? 0 : -1;
  p->guidance = 0;
  p->scale = 3.0;
  p->seed_b = -1;
  p->frames = 8;
}

static gboolean
fail (GError **error, const char *fmt, ...) G_GNUC_PRINTF (2, 3);

static gboolean
fail (GError **error, const char *fmt, ...)
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

gboolean
df_plugin_params_check (const DfPluginParams *p, GError **error)
{
  g_return_val_if_fail (p != NULL, FALSE);

  if (p->kind < 0 || p->kind >= DF_N_PROCS)
    return fail (error, "unknown procedure kind %d", p->kind);
  if (p->steps < 1 || p->steps > DF_MAX_STEPS)
    return fail (error, "steps %d is out of range: use 1..%d",
                 p->steps, DF_MAX_STEPS);
  if (p->seed < -1)
    return fail (error, "seed %d is out of range: use 0 or more, "
                 "or -1 for a random seed", p->seed);

  if (p->kind == DF_PROC_INTERPOLATE)
    {
      if (p->seed_b < -1)
        return fail (error, "seed-b %d is out of range: use 0 or more, "
                     "or -1 for a random seed", p->seed_b);
      if (p->frames < 2 || p->frames > DF_MAX_FRAMES)
        return fail (error, "frames %d is out of range: use 2..%d",
                     p->frames, DF_MAX_FRAMES);
      if (p->class_label < -1)
        return fail (error, "class %d is out of range: use -1 for none "
                     "or a class index", p->class_label);
      return TRUE;
    }

  if (p->count < 1 || p->count > DF_MAX_COUNT)
    return fail (error, "count %d is out of range: use 1..%d",
                 p->count, DF_MAX_COUNT);
  if (!isfinite (p->eta) || p->eta < 0.0 || p->eta > 1.0)
    return fail (error, "eta %g is out of range: use 0..1 "
                 "(0 is deterministic DDIM)", p->eta);
  if (p->sampler != 0 && p->sampler != 1)
    return fail (error, "sampler %d is unknown: use 0 (DDIM) or 1 (DDPM)",
                 p->sampler);

  if (p->kind == DF_PROC_CLASS_GUIDED)
    {
      if (p->class_label < 0)
        return fail (error, "class %d is out of range: use a class index "
                     "(0 or more)", p->class_label);
      if (p->guidance != 0 && p->guidance != 1)
        return fail (error, "guidance %d is unknown: use 0 (classifier-free) "
                     "or 1 (classifier)", p->guidance);
      if (!isfinite (p->scale) || p->scale < 0.0 || p->scale > DF_MAX_SCALE)
        return fail (error, "guidance scale %g is out of range: use 0..%g",
                     p->scale, DF_MAX_SCALE);
    }
  return TRUE;
}

const char *
df_proc_name (DfProcKind kind)
{
  g_return_val_if_fail (kind >= 0 && kind < DF_N_PROCS, NULL);
  return proc_names[kind];
}

int
df_proc_kind_from_name (const char *name)
{
  for (int i = 0; i < DF_N_PROCS; i++)
    if (g_strcmp0 (name, proc_names[i]) == 0)
      return i;
  return -1;
}

const char *
df_weights_dir (void)
{
  const char *env = g_getenv ("DIFFUSE_WEIGHTS");

  return env != NULL && env[0] != '\0' ? env : DF_WEIGHTS_DIR;
}

char *
df_resolve_model_path (const char *path, gboolean classifier)
{
  if (path != NULL && path[0] != '\0')
    return g_strdup (path);
  return g_build_filename (df_weights_dir (),
                           classifier ? DEFAULT_CLASSIFIER : DEFAULT_MODEL,
                           NULL);
}

void
df_plugin_params_set_path (char *field, const char *path)
{
  g_strlcpy (field, path != NULL ? path : "", DF_PARAMS_PATH_MAX);
}
