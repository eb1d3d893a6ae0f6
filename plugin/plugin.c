/* plugin.c: the GIMP 2.10 glue.  Registers Generate, Interpolate and
 * Class-guided under <Image>/Filters/Render/Diffusion/, turns PDB arguments
 * (or the dialog) into a DfJob, runs it, and adds its results as layers.
 *
 * Links libgimp (no GTK of its own) and GTK3 for the dialog, never gimpui.
 * A job is run to the end before the image is touched, so a failed or
 * cancelled job leaves the image as it was.
 */
#include <string.h>

/* Pixels go in through libgimp's tile API (GimpPixelRgn), as libgimp
 * itself does for plug-ins that do not enable high precision: a GeglBuffer
 * would need gegl_init (), which costs 1-2 s of babl set-up per job. */
#define GIMP_DISABLE_DEPRECATION_WARNINGS
#include <libgimp/gimp.h>

#include "dialog.h"
#include "job.h"
#include "params.h"

#define PLUG_IN_BINARY "diffuse"
#define PARASITE_NAME  "diffusion-params"

static void query (void);
static void run   (const gchar *name, gint nparams, const GimpParam *param,
                   gint *nreturn_vals, GimpParam **return_vals);

const GimpPlugInInfo PLUG_IN_INFO = { NULL, NULL, query, run };

MAIN ()

/* ---- registration ---- */

#define COMMON_ARGS                                                        \
  { GIMP_PDB_INT32,    "run-mode", "The run mode { RUN-INTERACTIVE (0), "  \
                                   "RUN-NONINTERACTIVE (1), "              \
                                   "RUN-WITH-LAST-VALS (2) }" },           \
  { GIMP_PDB_IMAGE,    "image",    "Input image" },                        \
  { GIMP_PDB_DRAWABLE, "drawable", "Input drawable (unused; may be -1)" }, \
  { GIMP_PDB_STRING,   "model",    "Model file (.safetensors or a "        \
                                   "diffusers folder); \"\" = the shipped "\
                                   "Fashion-MNIST model" }

static const GimpParamDef generate_args[] = {
  COMMON_ARGS,
  { GIMP_PDB_INT32, "count",   "Number of samples (1..64), one layer each" },
  { GIMP_PDB_INT32, "steps",   "Denoising steps (1..1000, at most the "
                               "model's timesteps)" },
  { GIMP_PDB_FLOAT, "eta",     "DDIM eta (0..1; 0 = deterministic)" },
  { GIMP_PDB_INT32, "seed",    "Seed (-1 = random)" },
  { GIMP_PDB_INT32, "sampler", "Sampler { DDIM (0), DDPM (1) }" },
};

static const GimpParamDef interpolate_args[] = {
  COMMON_ARGS,
  { GIMP_PDB_INT32, "seed-a", "First seed (frame 1 equals Generate with it)" },
  { GIMP_PDB_INT32, "seed-b", "Last seed" },
  { GIMP_PDB_INT32, "frames", "Number of frames (2..64), one layer each" },
  { GIMP_PDB_INT32, "steps",  "DDIM steps (eta 0)" },
  { GIMP_PDB_INT32, "class",  "Class (-1 = none)" },
};

static const GimpParamDef class_guided_args[] = {
  COMMON_ARGS,
  { GIMP_PDB_INT32,  "class",      "Class to generate (0..classes-1)" },
  { GIMP_PDB_INT32,  "count",      "Number of samples (1..64)" },
  { GIMP_PDB_INT32,  "steps",      "Denoising steps (1..1000)" },
  { GIMP_PDB_FLOAT,  "eta",        "DDIM eta (0..1)" },
  { GIMP_PDB_INT32,  "seed",       "Seed (-1 = random)" },
  { GIMP_PDB_INT32,  "guidance",   "Guidance { CLASSIFIER-FREE (0), "
                                   "CLASSIFIER (1) }" },
  { GIMP_PDB_FLOAT,  "scale",      "Guidance scale (0..100)" },
  { GIMP_PDB_STRING, "classifier", "Classifier file; \"\" = the shipped "
                                   "classifier" },
};

static const GimpParamDef return_vals[] = {
  { GIMP_PDB_INT32,      "n-layers",  "Number of new layers" },
  { GIMP_PDB_INT32ARRAY, "layer-ids", "The new layers, bottom to top" },
};

typedef struct {
  const GimpParamDef *args;
  int                 n_args;
  const char         *blurb;
  const char         *help;
  const char         *menu_label;
} ProcInfo;

static const ProcInfo procs[DF_N_PROCS] = {
  { generate_args, G_N_ELEMENTS (generate_args),
    "Generate images with a diffusion model into new layers",
    "Samples a denoising diffusion model (DDIM or DDPM) and adds each "
    "sample as a new layer, scaled to the image, above the active layer.",
    "_Generate..." },
  { interpolate_args, G_N_ELEMENTS (interpolate_args),
    "Interpolate between two seeds into animation frames",
    "Slerps the initial noise of two seeds and decodes each frame with DDIM "
    "at eta 0, one layer per frame named with a (100ms) delay, so "
    "Filters > Animation > Playback and GIF export play them.",
    "_Interpolate between seeds..." },
  { class_guided_args, G_N_ELEMENTS (class_guided_args),
    "Generate images of one class with classifier-free or classifier "
    "guidance",
    "Samples a class-conditional diffusion model guided towards a class, "
    "either classifier-free (eps_u + s (eps_c - eps_u)) or by a noisy "
    "classifier's gradient, one layer per sample.",
    "_Class-guided..." },
};

static void
query (void)
{
  for (int k = 0; k < DF_N_PROCS; k++)
    {
      gimp_install_procedure (df_proc_name (k), procs[k].blurb, procs[k].help,
                              "diffuse authors", "diffuse authors", "2024",
                              procs[k].menu_label, "RGB*, GRAY*",
                              GIMP_PLUGIN, procs[k].n_args,
                              G_N_ELEMENTS (return_vals), procs[k].args,
                              return_vals);
      gimp_plugin_menu_register (df_proc_name (k),
                                 "<Image>/Filters/Render/Diffusion");
    }
}

/* ---- arguments ---- */

static gboolean
take_path (char *field, const char *value, const char *what, GError **error)
{
  if (value == NULL)
    value = "";
  if (strlen (value) >= DF_PARAMS_PATH_MAX)
    {
      g_set_error (error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CALLING,
                   "%s path is longer than %d bytes", what,
                   DF_PARAMS_PATH_MAX - 1);
      return FALSE;
    }
  df_plugin_params_set_path (field, value);
  return TRUE;
}

/* PDB arguments -> params, in the order registered above. */
static gboolean
params_from_args (DfProcKind kind, int nparams, const GimpParam *a,
                  DfPluginParams *p, GError **error)
{
  if (nparams != procs[kind].n_args)
    {
      g_set_error (error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CALLING,
                   "%s takes %d arguments, got %d", df_proc_name (kind),
                   procs[kind].n_args, nparams);
      return FALSE;
    }
  if (!take_path (p->model, a[3].data.d_string, "model", error))
    return FALSE;

  switch (kind)
    {
    case DF_PROC_GENERATE:
      p->count = a[4].data.d_int32;
      p->steps = a[5].data.d_int32;
      p->eta = a[6].data.d_float;
      p->seed = a[7].data.d_int32;
      p->sampler = a[8].data.d_int32;
      break;
    case DF_PROC_INTERPOLATE:
      p->seed = a[4].data.d_int32;
      p->seed_b = a[5].data.d_int32;
      p->frames = a[6].data.d_int32;
      p->steps = a[7].data.d_int32;
      p->class_label = a[8].data.d_int32;
      break;
    case DF_PROC_CLASS_GUIDED:
      p->class_label = a[4].data.d_int32;
      p->count = a[5].data.d_int32;
      p->steps = a[6].data.d_int32;
      p->eta = a[7].data.d_float;
      p->seed = a[8].data.d_int32;
      p->guidance = a[9].data.d_int32;
      p->scale = a[10].data.d_float;
      if (!take_path (p->classifier, a[11].data.d_string, "classifier",
                      error))
        return FALSE;
      break;
    }
  return df_plugin_params_check (p, error);
}

/* ---- interactive ---- */

/* GIMP's progress starts with the first step, not when the dialog opens:
 * the user may still be choosing settings. */
static void
gimp_progress_hook (gpointer data, double fraction)
{
  gboolean *started = data;

  if (!*started)
    gimp_progress_init ("Diffusion: sampling");
  *started = TRUE;
  gimp_progress_update (fraction);
}

static DfJob *
run_dialog (DfPluginParams *p, GError **error)
{
  DfDialog *dialog;
  DfJob *job;
  gboolean started = FALSE;

  /* GIMP 2.10's windows are X11 ones: a Wayland GTK3 could not be made
   * transient for them. */
  gdk_set_allowed_backends ("x11,*");
  if (!gtk_init_check (NULL, NULL))
    {
      g_set_error_literal (error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_EXECUTION,
                           "cannot open a display for the dialog; run the "
                           "procedure non-interactively instead");
      return NULL;
    }

  dialog = df_dialog_new (p);
  df_dialog_set_progress_hook (dialog, gimp_progress_hook, &started);
  if (gimp_default_display () > 0)
    df_dialog_set_transient_for_xid (dialog,
        (gulong) gimp_display_get_window_handle (gimp_default_display ()));

  job = df_dialog_run (dialog);
  df_dialog_free (dialog);
  if (job == NULL && started)
    gimp_progress_end ();
  if (job == NULL)
    g_set_error_literal (error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CANCELLED,
                         "cancelled");
  return job;
}

/* ---- non-interactive ---- */

static void
pdb_progress (gpointer data, double fraction, const float *x0, int c, int h,
              int w)
{
  gimp_progress_update (fraction);
}

static DfJob *
run_job (const DfPluginParams *p, GError **error)
{
  DfJob *job = df_job_new (p, error);

  if (job == NULL)
    return NULL;
  gimp_progress_init ("Diffusion: sampling");
  if (!df_job_run (job, pdb_progress, NULL, NULL, error))
    {
      df_job_free (job);
      return NULL;
    }
  return job;
}

/* ---- layers ---- */

/* One layer per result, above the active layer, scaled to the image by
 * GIMP (its interpolation setting), with the parameters as a parasite.
 * One undo group for all of them.  Returns the new layer IDs. */
static gint32 *
add_layers (DfJob *job, gint32 image, gboolean alpha)
{
  gboolean rgb = gimp_image_base_type (image) == GIMP_RGB;
  int iw = gimp_image_width (image), ih = gimp_image_height (image);
  GimpImageType type = rgb ? (alpha ? GIMP_RGBA_IMAGE : GIMP_RGB_IMAGE)
                           : (alpha ? GIMP_GRAYA_IMAGE : GIMP_GRAY_IMAGE);
  gint32 *ids = g_new (gint32, job->n);
  guint8 *pixels = g_new (guint8, (gsize) job->width * job->height * 4);

  gimp_image_undo_group_start (image);
  for (int i = 0; i < job->n; i++)
    {
      char *name = df_job_layer_name (job, i);
      char *json = df_job_params_json (job, i);
      GimpParasite *parasite;
      GimpDrawable *drawable;
      GimpPixelRgn rgn;
      gint32 layer;

      layer = gimp_layer_new (image, name, job->width, job->height, type,
                              100.0, GIMP_LAYER_MODE_NORMAL);

      /* 8-bit pixels at the model's size; GIMP converts them to the
       * image's precision. */
      df_job_result_pixels (job, i, rgb, alpha, pixels);
      drawable = gimp_drawable_get (layer);
      gimp_pixel_rgn_init (&rgn, drawable, 0, 0, job->width, job->height,
                           TRUE, FALSE);
      gimp_pixel_rgn_set_rect (&rgn, pixels, 0, 0, job->width, job->height);
      gimp_drawable_flush (drawable);
      gimp_drawable_detach (drawable);

      /* -1, -1: above the active layer, in its group; the new layer becomes
       * the active one, so results stack bottom to top in order (frame 1
       * lowest, as GIMP's animation playback wants). */
      gimp_image_insert_layer (image, layer, -1, -1);
      if (iw != job->width || ih != job->height)
        gimp_layer_scale (layer, iw, ih, FALSE);
      gimp_layer_set_offsets (layer, 0, 0);

      parasite = gimp_parasite_new (PARASITE_NAME,
                                    GIMP_PARASITE_PERSISTENT
                                    | GIMP_PARASITE_UNDOABLE,
                                    strlen (json) + 1, json);
      gimp_item_attach_parasite (layer, parasite);
      gimp_parasite_free (parasite);

      ids[i] = layer;
      g_free (name);
      g_free (json);
    }
  gimp_image_undo_group_end (image);

  g_free (pixels);
  return ids;
}

/* ---- run ---- */

static void
run (const gchar *name, gint nparams, const GimpParam *param,
     gint *nreturn_vals, GimpParam **return_vals)
{
  static GimpParam values[3];
  int kind = df_proc_kind_from_name (name);
  GimpRunMode mode = nparams > 0 ? param[0].data.d_int32 : -1;
  gint32 image = nparams > 1 ? param[1].data.d_image : -1;
  gint32 drawable = nparams > 2 ? param[2].data.d_drawable : -1;
  GimpPDBStatusType status = GIMP_PDB_SUCCESS;
  static GError *error = NULL;      /* its message outlives run () */
  DfPluginParams p;
  DfJob *job = NULL;
  gint64 start = g_get_monotonic_time ();

  g_clear_error (&error);
  *nreturn_vals = 1;
  *return_vals = values;
  values[0].type = GIMP_PDB_STATUS;

  if (kind < 0 || nparams < 3 || !gimp_image_is_valid (image))
    {
      g_set_error (&error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CALLING,
                   "%s: needs a run mode, a valid image and a drawable",
                   name);
      goto done;
    }
  if (gimp_image_base_type (image) == GIMP_INDEXED)
    {
      g_set_error_literal (&error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CALLING,
                           "the image is indexed: convert it to RGB or "
                           "grayscale (Image > Mode) first");
      goto done;
    }

  df_plugin_params_init (&p, kind);

  switch (mode)
    {
    case GIMP_RUN_INTERACTIVE:
      if (gimp_get_data_size (name) == sizeof p)
        gimp_get_data (name, &p);
      p.kind = kind;
      job = run_dialog (&p, &error);
      break;

    case GIMP_RUN_NONINTERACTIVE:
      if (params_from_args (kind, nparams, param, &p, &error))
        job = run_job (&p, &error);
      break;

    case GIMP_RUN_WITH_LAST_VALS:
      if (gimp_get_data_size (name) == sizeof p)
        gimp_get_data (name, &p);
      p.kind = kind;
      job = run_job (&p, &error);
      break;

    default:
      g_set_error (&error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CALLING,
                   "unknown run mode %d", mode);
      break;
    }

  if (job != NULL)
    {
      gboolean alpha = drawable > 0 && gimp_item_is_drawable (drawable)
                       && gimp_drawable_has_alpha (drawable);
      gint32 *ids;

      g_debug ("%s: job done at %.3f s", name,
               (g_get_monotonic_time () - start) / 1e6);
      ids = add_layers (job, image, alpha);

      gimp_progress_update (1.0);
      /* Save what the user asked for (a random seed stays random). */
      gimp_set_data (name, &p, sizeof p);
      if (mode == GIMP_RUN_INTERACTIVE)
        gimp_displays_flush ();

      g_debug ("%s: %d layers, engine %.3f s, whole run %.3f s", name,
               job->n, job->seconds,
               (g_get_monotonic_time () - start) / 1e6);
      *nreturn_vals = 3;
      values[1].type = GIMP_PDB_INT32;
      values[1].data.d_int32 = job->n;
      values[2].type = GIMP_PDB_INT32ARRAY;
      values[2].data.d_int32array = ids;    /* libgimp frees nothing here */
      df_job_free (job);
    }

done:
  if (error != NULL)
    {
      if (g_error_matches (error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CANCELLED))
        status = GIMP_PDB_CANCEL;
      else if (g_error_matches (error, DF_PLUGIN_ERROR,
                                DF_PLUGIN_ERROR_CALLING))
        status = GIMP_PDB_CALLING_ERROR;
      else
        status = GIMP_PDB_EXECUTION_ERROR;

      /* GIMP 2.10 takes an error message from a string second value.  It
       * pads a shorter answer with the declared return values, and an
       * INT32ARRAY after the string would then be sent with the string's
       * bits as its length: a plain INT32 third value keeps the wire safe. */
      if (status != GIMP_PDB_CANCEL)
        {
          *nreturn_vals = 3;
          values[1].type = GIMP_PDB_STRING;
          values[1].data.d_string = error->message;
          values[2].type = GIMP_PDB_INT32;
          values[2].data.d_int32 = 0;
        }
    }
  values[0].data.d_status = status;
}
