/* diffuse.c: the `diffuse` command line: generate, interpolate, info,
 * schedule and eps here; train and eval in their own files.
 *
 * Every command checks its input before it loads anything heavy, keeps its
 * results in memory, and writes them only when the whole job succeeded.
 * Errors end the program with status 1 and one line "diffuse: MESSAGE".
 */
#include "cli.h"

#include <json-glib/json-glib.h>
#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "blas.h"

/* ---- sampling options shared by generate and interpolate ---- */

typedef struct {
  char     *model, *sampler, *spacing, *variance, *class_name, *guidance;
  char     *classifier, *out, *seed, *seeds, *interval;
  int       steps, count, batch, frames, threads;
  double    eta, scale;
  gboolean  no_clip, quiet;
  gboolean  interpolate;       /* set by the command, not an option */
} GenOptions;

static void
gen_options_init (GenOptions *o)
{
  memset (o, 0, sizeof *o);
  o->steps = 50;
  o->count = 16;
  o->frames = 8;

  /* Unset until parsed: an option given where it has no effect is an
   * error, so these must tell "given" from "default". */
  o->eta = CLI_DOUBLE_UNSET;
  o->scale = CLI_DOUBLE_UNSET;
}

/* The defaults of what was not given (strings only after parsing: GOption
 * would drop a default string without freeing it). */
static void
gen_options_defaults (GenOptions *o)
{
  if (o->out == NULL)
    o->out = g_strdup ("out");
  if (o->seed == NULL)
    o->seed = g_strdup ("0");
}

static void
gen_options_clear (GenOptions *o)
{
  g_free (o->model);
  g_free (o->sampler);
  g_free (o->spacing);
  g_free (o->variance);
  g_free (o->class_name);
  g_free (o->guidance);
  g_free (o->classifier);
  g_free (o->out);
  g_free (o->seed);
  g_free (o->seeds);
  g_free (o->interval);
}

#define OPT_MODEL(o) \
  { "model", 'm', 0, G_OPTION_ARG_FILENAME, &(o)->model, \
    "Model file (default: the shipped Fashion-MNIST UNet)", "PATH" }
#define OPT_THREADS(o) \
  { "threads", 'j', 0, G_OPTION_ARG_INT, &(o)->threads, \
    "Threads (default 0: all cores)", "N" }
#define OPT_QUIET(o) \
  { "quiet", 'q', 0, G_OPTION_ARG_NONE, &(o)->quiet, \
    "No progress line", NULL }

/* Checks that need no model: done first so a typo fails at once. */
static gboolean
check_sampling_options (const GenOptions *o, DfSampleParams *p, GError **error)
{
  gboolean eta_given = o->eta != CLI_DOUBLE_UNSET;
  gboolean scale_given = o->scale != CLI_DOUBLE_UNSET;

  df_sample_params_init (p);

  if (o->steps < 1)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--steps %d: give at least 1 denoising step", o->steps);
      return FALSE;
    }
  /* The plug-in's range; the sampler would take eta > 1 but clamp it. */
  if (eta_given && !(o->eta >= 0 && o->eta <= 1))
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--eta %g is out of range: use 0..1 (0 is deterministic "
                   "DDIM, 1 is DDPM-like)", o->eta);
      return FALSE;
    }
  if (scale_given && !(o->scale >= 0 && o->scale <= DF_GUIDE_SCALE_MAX))
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--guidance-scale %g is out of range: use 0..%g (0 "
                   "unconditional, 1 conditional, more guides harder)",
                   o->scale, DF_GUIDE_SCALE_MAX);
      return FALSE;
    }
  if (o->out != NULL && o->out[0] == '\0')
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--out \"\": give the folder to write the images to");
      return FALSE;
    }
  if (o->threads < 0 || o->threads > DF_MAX_THREADS)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--threads %d: give 0 (all cores) to %d", o->threads,
                   DF_MAX_THREADS);
      return FALSE;
    }
  if (o->batch < 0)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--batch %d: give 1 or more (0: automatic)", o->batch);
      return FALSE;
    }

  if (o->sampler == NULL || strcmp (o->sampler, "ddim") == 0)
    p->sampler = DF_SAMPLER_DDIM;
  else if (strcmp (o->sampler, "ddpm") == 0)
    p->sampler = DF_SAMPLER_DDPM;
  else
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--sampler %s: give ddim or ddpm", o->sampler);
      return FALSE;
    }
  if (o->spacing && !df_spacing_parse (o->spacing, &p->spacing))
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--spacing %s: give leading, trailing or linspace",
                   o->spacing);
      return FALSE;
    }
  if (o->variance == NULL || strcmp (o->variance, "fixed_small") == 0)
    p->variance = DF_VARIANCE_FIXED_SMALL;
  else if (strcmp (o->variance, "fixed_large") == 0)
    p->variance = DF_VARIANCE_FIXED_LARGE;
  else
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--variance %s: give fixed_small or fixed_large",
                   o->variance);
      return FALSE;
    }
  if (o->guidance && strcmp (o->guidance, "free") != 0
      && strcmp (o->guidance, "classifier") != 0
      && strcmp (o->guidance, "none") != 0)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--guidance %s: give free, classifier or none",
                   o->guidance);
      return FALSE;
    }
  if (o->guidance && strcmp (o->guidance, "none") != 0 && o->class_name == NULL)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--guidance %s guides towards a class: give --class too",
                   o->guidance);
      return FALSE;
    }

  /* An option given where it does nothing is a mistake worth hearing of. */
  if (eta_given && p->sampler == DF_SAMPLER_DDPM)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--eta %g has no effect with --sampler ddpm (eta is the "
                   "DDIM sampler's noise): drop --eta or use --sampler ddim",
                   o->eta);
      return FALSE;
    }
  if (o->variance && p->sampler == DF_SAMPLER_DDIM)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--variance %s has no effect with --sampler ddim%s: give "
                   "--sampler ddpm or drop --variance", o->variance,
                   o->sampler ? "" : " (the default)");
      return FALSE;
    }
  if (scale_given && o->class_name == NULL)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--guidance-scale %g has no effect without --class: give "
                   "the class to guide towards or drop --guidance-scale",
                   o->scale);
      return FALSE;
    }
  if (o->interval && o->class_name == NULL)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--guidance-interval %s has no effect without --class: "
                   "give the class to guide towards or drop "
                   "--guidance-interval", o->interval);
      return FALSE;
    }
  if (o->interval && o->guidance && strcmp (o->guidance, "none") == 0)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--guidance-interval %s has no effect with --guidance "
                   "none: drop one of them", o->interval);
      return FALSE;
    }
  if (o->interval
      && !cli_parse_interval ("--guidance-interval", o->interval,
                              &p->guide_lo, &p->guide_hi, error))
    return FALSE;
  if (scale_given && o->guidance && strcmp (o->guidance, "none") == 0)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--guidance-scale %g has no effect with --guidance none: "
                   "drop one of them", o->scale);
      return FALSE;
    }
  if (o->classifier
      && (o->guidance == NULL || strcmp (o->guidance, "classifier") != 0))
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--classifier %s has no effect without --guidance "
                   "classifier: give that too or drop --classifier",
                   o->classifier);
      return FALSE;
    }
  if (!cli_parse_u64 ("--seed", o->seed, &p->seed, error))
    return FALSE;

  p->steps = o->steps;
  p->eta = eta_given ? o->eta : 0.0;
  p->clip_x0 = !o->no_clip;
  p->scale = scale_given ? o->scale : 3.0;
  return TRUE;
}

/* Checks against the model, the class and guidance; loads the classifier
 * for classifier guidance into *classifier. */
static gboolean
check_model_options (const GenOptions *o, DfModel *m, DfSampleParams *p,
                     DfModel **classifier, GError **error)
{
  int T = df_model_schedule (m)->T;

  *classifier = NULL;
  if (df_model_is_classifier (m))
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s is a noisy classifier, not a diffusion model: pass it "
                   "with --classifier and a UNet with --model",
                   df_model_path (m));
      return FALSE;
    }
  if (o->steps > T)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--steps %d: %s was trained with %d timesteps, give 1 to %d",
                   o->steps, df_model_path (m), T, T);
      return FALSE;
    }

  if (o->class_name == NULL)
    return TRUE;
  if (!cli_parse_class (m, o->class_name, &p->label, error))
    return FALSE;

  /* Classifier-free guidance is the default when the model was trained
   * with an unconditional class. */
  if (o->guidance == NULL)
    p->guidance = df_model_uncond_class (m) >= 0 ? DF_GUIDANCE_FREE
                                                 : DF_GUIDANCE_NONE;
  else if (strcmp (o->guidance, "free") == 0)
    p->guidance = DF_GUIDANCE_FREE;
  else if (strcmp (o->guidance, "classifier") == 0)
    p->guidance = DF_GUIDANCE_CLASSIFIER;
  else
    p->guidance = DF_GUIDANCE_NONE;

  if (p->guidance == DF_GUIDANCE_NONE
      && (o->scale != CLI_DOUBLE_UNSET || o->interval != NULL))
    {
      /* Only the default can land here: --guidance none was refused. */
      const char *opt = o->interval ? "--guidance-interval"
                                    : "--guidance-scale";
      char *value = o->interval ? g_strdup (o->interval)
                                : g_strdup_printf ("%g", o->scale);

      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s %s has no effect: %s has no unconditional class, so "
                   "--class %s samples without guidance; %sdrop %s", opt,
                   value, df_model_path (m), o->class_name,
                   o->interpolate ? "" : "give --guidance classifier or ",
                   opt);
      g_free (value);
      return FALSE;
    }
  /* The default interval; scale 0 asks for unconditional sampling, which
   * outside an interval would be conditional. */
  if (p->guidance == DF_GUIDANCE_FREE && o->interval == NULL
      && p->scale != 0.0)
    {
      p->guide_lo = DF_FREE_GUIDE_LO;
      p->guide_hi = DF_FREE_GUIDE_HI;
    }
  if (p->guidance == DF_GUIDANCE_FREE && df_model_uncond_class (m) < 0)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--guidance free: %s has no unconditional class; use "
                   "--guidance none or classifier", df_model_path (m));
      return FALSE;
    }
  if (p->guidance == DF_GUIDANCE_CLASSIFIER)
    {
      DfModel *c = cli_load_model (o->classifier, CLI_CLASSIFIER_FILE, error);
      if (c == NULL)
        return FALSE;
      if (!df_model_is_classifier (c))
        {
          g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                       "--classifier %s is a diffusion model, not a noisy "
                       "classifier (train one with --task classifier)",
                       df_model_path (c));
          df_model_free (c);
          return FALSE;
        }
      if (df_model_channels (c) != df_model_channels (m)
          || df_model_size (c) != df_model_size (m)
          || df_model_schedule (c)->T != T)
        {
          g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                       "--classifier %s (%d x %d x %d, T %d) does not fit the "
                       "model (%d x %d x %d, T %d)", df_model_path (c),
                       df_model_channels (c), df_model_size (c),
                       df_model_size (c), df_model_schedule (c)->T,
                       df_model_channels (m), df_model_size (m),
                       df_model_size (m), T);
          df_model_free (c);
          return FALSE;
        }
      /* A classifier of other classes would steer towards the wrong
       * one, or past the end of its logits. */
      if (!df_model_check_classifier (m, c, "--classifier", error))
        {
          df_model_free (c);
          return FALSE;
        }
      *classifier = c;
    }

  if (!cli_check_guidance_acts (df_model_schedule (m), p, o->interval,
                                o->scale != CLI_DOUBLE_UNSET, TRUE, error))
    {
      g_clear_pointer (classifier, df_model_free);
      return FALSE;
    }
  return TRUE;
}

static int
cmd_sample (int argc, char **argv, gboolean interpolate)
{
  GenOptions o;
  GOptionEntry gen_entries[] = {
    OPT_MODEL (&o),
    { "steps", 's', 0, G_OPTION_ARG_INT, &o.steps,
      "Denoising steps, 1 to T (default 50)", "N" },
    { "eta", 'e', 0, G_OPTION_ARG_DOUBLE, &o.eta,
      "DDIM noise, 0 to 1: 0 deterministic (default), 1 DDPM-like", "ETA" },
    { "sampler", 0, 0, G_OPTION_ARG_STRING, &o.sampler,
      "ddim (default) or ddpm", "NAME" },
    { "spacing", 0, 0, G_OPTION_ARG_STRING, &o.spacing,
      "Timestep spacing: leading (default), trailing or linspace", "NAME" },
    { "variance", 0, 0, G_OPTION_ARG_STRING, &o.variance,
      "DDPM variance: fixed_small (default) or fixed_large", "NAME" },
    { "no-clip", 0, 0, G_OPTION_ARG_NONE, &o.no_clip,
      "Do not clip the predicted x0 to [-1, 1] (clipped by default)", NULL },
    { "seed", 0, 0, G_OPTION_ARG_STRING, &o.seed,
      "Noise seed (default 0)", "N" },
    { "count", 'n', 0, G_OPTION_ARG_INT, &o.count,
      "Number of images (default 16)", "N" },
    { "batch", 'b', 0, G_OPTION_ARG_INT, &o.batch,
      "Images per forward pass (default 0: automatic, up to 16)", "N" },
    { "class", 'c', 0, G_OPTION_ARG_STRING, &o.class_name,
      "Class name or index, class-conditional models: a name is matched "
      "first, then an index", "CLASS" },
    { "guidance", 'g', 0, G_OPTION_ARG_STRING, &o.guidance,
      "free (default with --class), classifier or none", "KIND" },
    { "guidance-scale", 0, 0, G_OPTION_ARG_DOUBLE, &o.scale,
      "Guidance scale, with --class (default 3)", "S" },
    { "guidance-interval", 0, 0, G_OPTION_ARG_STRING, &o.interval,
      "Guide only at noise levels sigma in (LOW, HIGH]; 0,inf guides every "
      "step (default " DF_FREE_GUIDE_TEXT " for free guidance, every step "
      "for classifier guidance)", "LOW,HIGH" },
    { "classifier", 0, 0, G_OPTION_ARG_FILENAME, &o.classifier,
      "Noisy classifier for --guidance classifier (default: shipped)", "PATH" },
    OPT_THREADS (&o),
    { "out", 'o', 0, G_OPTION_ARG_FILENAME, &o.out,
      "Output folder (default out)", "DIR" },
    OPT_QUIET (&o),
    { NULL }
  };
  GOptionEntry interp_entries[] = {
    OPT_MODEL (&o),
    { "seeds", 0, 0, G_OPTION_ARG_STRING, &o.seeds,
      "The two seeds to interpolate between", "A,B" },
    { "frames", 'f', 0, G_OPTION_ARG_INT, &o.frames,
      "Frames, both ends included (default 8)", "N" },
    { "steps", 's', 0, G_OPTION_ARG_INT, &o.steps,
      "DDIM steps (eta 0), 1 to T (default 50)", "N" },
    { "spacing", 0, 0, G_OPTION_ARG_STRING, &o.spacing,
      "Timestep spacing: leading (default), trailing or linspace", "NAME" },
    { "no-clip", 0, 0, G_OPTION_ARG_NONE, &o.no_clip,
      "Do not clip the predicted x0 to [-1, 1] (clipped by default)", NULL },
    { "batch", 'b', 0, G_OPTION_ARG_INT, &o.batch,
      "Frames per forward pass (default 0: automatic, up to 16)", "N" },
    { "class", 'c', 0, G_OPTION_ARG_STRING, &o.class_name,
      "Class name or index, class-conditional models: a name is matched "
      "first, then an index", "CLASS" },
    { "guidance", 'g', 0, G_OPTION_ARG_STRING, &o.guidance,
      "free (default with --class) or none", "KIND" },
    { "guidance-scale", 0, 0, G_OPTION_ARG_DOUBLE, &o.scale,
      "Guidance scale, with --class (default 3)", "S" },
    { "guidance-interval", 0, 0, G_OPTION_ARG_STRING, &o.interval,
      "Guide only at noise levels sigma in (LOW, HIGH]; 0,inf guides every "
      "step (default " DF_FREE_GUIDE_TEXT ")", "LOW,HIGH" },
    OPT_THREADS (&o),
    { "out", 'o', 0, G_OPTION_ARG_FILENAME, &o.out,
      "Output folder (default out)", "DIR" },
    OPT_QUIET (&o),
    { NULL }
  };
  const char *cmd = interpolate ? "interpolate" : "generate";
  GError *error = NULL;
  DfSampleParams p;
  DfModel *m = NULL, *classifier = NULL;
  CliOutput *out = NULL;
  CliProgress progress;
  guint64 seed_a = 0, seed_b = 0;
  float *images = NULL;
  int n, c, s, batch;
  gboolean ok = FALSE;

  gen_options_init (&o);
  o.interpolate = interpolate;
  if (!cli_parse (cmd, "", interpolate
                  ? "Decode frames of slerped noise between two seeds with "
                    "DDIM (eta 0) into DIR/0000.png ... and DIR/strip.png."
                  : "Sample images into DIR/0000.png ... and DIR/grid.png.",
                  interpolate ? interp_entries : gen_entries,
                  &argc, &argv, &error))
    goto out;
  gen_options_defaults (&o);

  /* Options first, then the model.  The folder is created only at the
   * end, but an unwritable one must not cost the whole run. */
  if (!check_sampling_options (&o, &p, &error)
      || !cli_check_output_dir ("--out", o.out, &error))
    goto out;
  if (interpolate)
    {
      char **parts;

      if (o.seeds == NULL)
        {
          g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                       "interpolate: give the two seeds with --seeds A,B");
          goto out;
        }
      parts = g_strsplit (o.seeds, ",", -1);
      ok = g_strv_length (parts) == 2
        && cli_parse_u64 ("--seeds", g_strstrip (parts[0]), &seed_a, NULL)
        && cli_parse_u64 ("--seeds", g_strstrip (parts[1]), &seed_b, NULL);
      g_strfreev (parts);
      if (!ok)
        {
          g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                       "--seeds %s: give two non-negative integers A,B",
                       o.seeds);
          goto out;
        }
      ok = FALSE;
      if (o.frames < 2)
        {
          g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                       "--frames %d: give at least 2", o.frames);
          goto out;
        }
      if (o.guidance && strcmp (o.guidance, "classifier") == 0)
        {
          g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                       "interpolate: --guidance classifier is not supported "
                       "(use free or none)");
          goto out;
        }
      n = o.frames;
    }
  else
    {
      if (o.count < 1)
        {
          g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                       "--count %d: give at least 1 image", o.count);
          goto out;
        }
      n = o.count;
    }

  df_set_threads (o.threads);
  m = cli_load_model (o.model, CLI_UNET_FILE, &error);
  if (m == NULL || !check_model_options (&o, m, &p, &classifier, &error))
    goto out;

  /* Run, then encode, then write: nothing lands on disk before the end. */
  c = df_model_channels (m);
  s = df_model_size (m);
  batch = o.batch > 0 ? MIN (o.batch, n) : MIN (n, 16);
  images = g_try_new (float, (gsize) n * c * s * s);    /* [N,C,H,W] */
  if (images == NULL)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s: not enough memory for %d images of %d x %d x %d",
                   cmd, n, c, s, s);
      goto out;
    }
  cli_progress_init (&progress, cmd,
                     o.steps * ((n + batch - 1) / batch), o.quiet);
  if (interpolate)
    ok = df_model_interpolate (m, &p, seed_a, seed_b, n, batch, images,
                               cli_progress_sampler, &progress,
                               cli_cancellable (), &error);
  else
    ok = df_model_generate (m, classifier, &p, n, batch, images,
                            cli_progress_sampler, &progress,
                            cli_cancellable (), &error);
  cli_progress_finish (&progress);
  if (!ok)
    goto out;

  out = cli_output_new (o.out);
  ok = cli_output_images (out, images, n, c, s, s,
                          interpolate ? "strip.png" : "grid.png",
                          interpolate ? n : cli_grid_cols (n), &error)
    && cli_output_commit (out, &error);
  if (ok)
    {
      char last[16];
      char *first = g_build_filename (o.out, "0000.png", NULL);
      char *final = NULL;
      char *overview = g_build_filename (o.out, interpolate ? "strip.png"
                                                            : "grid.png",
                                         NULL);

      /* One image is one file, not a range from it to itself. */
      g_snprintf (last, sizeof last, "%04d.png", n - 1);
      if (n > 1)
        final = g_build_filename (o.out, last, NULL);
      printf ("%s: wrote %s%s%s and %s\n", cmd, first, final ? " to " : "",
              final ? final : "", overview);
      g_free (first);
      g_free (final);
      g_free (overview);
    }

out:
  cli_output_free (out);
  g_free (images);
  if (classifier)
    df_model_free (classifier);
  if (m)
    df_model_free (m);
  gen_options_clear (&o);
  return ok ? 0 : cli_fail (error);
}

int
cli_generate (int argc, char **argv)
{
  return cmd_sample (argc, argv, FALSE);
}

int
cli_interpolate (int argc, char **argv)
{
  return cmd_sample (argc, argv, TRUE);
}

/* ---- info ---- */

int
cli_info (int argc, char **argv)
{
  char *model_path = NULL;
  GOptionEntry entries[] = {
    { "model", 'm', 0, G_OPTION_ARG_FILENAME, &model_path,
      "Model file (default: the shipped Fashion-MNIST UNet)", "PATH" },
    { NULL }
  };
  GError *error = NULL;
  DfModel *m = NULL;
  DfUNet *net;
  const DfSchedule *sch;
  JsonNode *cfg;
  char *json;
  int k;

  if (!cli_parse ("info", "", "Print a model's configuration, parameter "
                  "count, classes and schedule, and the BLAS kernel.",
                  entries, &argc, &argv, &error))
    return cli_fail (error);
  m = cli_load_model (model_path, CLI_UNET_FILE, &error);
  g_free (model_path);
  if (m == NULL)
    return cli_fail (error);
  if (!df_blas_init (&error))
    {
      df_model_free (m);
      return cli_fail (error);
    }

  net = df_model_net (m);
  sch = df_model_schedule (m);
  printf ("model: %s\n", df_model_path (m));
  printf ("kind: %s\n", df_model_is_classifier (m) ? "classifier" : "unet");
  printf ("parameters: %" G_GSIZE_FORMAT "\n", df_unet_param_count (net));
  printf ("image: %d x %d x %d (channels x height x width)\n",
          df_model_channels (m), df_model_size (m), df_model_size (m));

  k = df_model_num_classes (m);
  if (k > 0)
    {
      printf ("classes: %d\n", k);
      for (int i = 0; i < k; i++)
        printf ("  %d %s\n", i, df_model_class_name (m, i)
                ? df_model_class_name (m, i) : "");
    }
  else
    printf ("classes: none (unconditional)\n");
  if (df_model_uncond_class (m) >= 0)
    printf ("uncond class: %d\n", df_model_uncond_class (m));
  else
    printf ("uncond class: none\n");

  printf ("schedule: %s, T %d, beta %.6g to %.6g, alpha_bar %.6g to %.6g\n",
          df_beta_schedule_name (sch->kind), sch->T, sch->betas[0],
          sch->betas[sch->T - 1], sch->alphas_cumprod[0],
          sch->alphas_cumprod[sch->T - 1]);
  printf ("blas kernel: %s (%s; the CPU supports %s)\n", df_blas_corename (),
          df_blas_choice (), df_blas_cpu_coretype ());
  printf ("threads: %d\n", df_get_threads ());

  /* The config in diffusers' own keys, so it can be compared with a
   * diffusers config.json. */
  cfg = df_unet_config_to_json (df_unet_config (net));
  json = json_to_string (cfg, TRUE);
  printf ("config: %s\n", json);
  g_free (json);
  json_node_unref (cfg);
  df_model_free (m);
  return 0;
}

/* ---- schedule ---- */

int
cli_schedule (int argc, char **argv)
{
  char *model_path = NULL, *kind_name = NULL, *spacing_name = NULL;
  int T = CLI_INT_UNSET, steps = 50;
  GOptionEntry entries[] = {
    { "model", 'm', 0, G_OPTION_ARG_FILENAME, &model_path,
      "Take the schedule from this model", "PATH" },
    { "beta-schedule", 0, 0, G_OPTION_ARG_STRING, &kind_name,
      "linear (default), scaled_linear or cosine", "NAME" },
    { "timesteps", 'T', 0, G_OPTION_ARG_INT, &T,
      "Training timesteps T, without --model (default 1000)", "T" },
    { "steps", 's', 0, G_OPTION_ARG_INT, &steps,
      "Sampling steps, 1 to T (default 50)", "N" },
    { "spacing", 0, 0, G_OPTION_ARG_STRING, &spacing_name,
      "leading (default), trailing or linspace", "NAME" },
    { NULL }
  };
  GError *error = NULL;
  DfModel *m = NULL;
  DfSchedule *own = NULL;
  const DfSchedule *sch;
  DfBetaSchedule kind = DF_BETA_LINEAR;
  DfSpacing spacing = DF_SPACING_LEADING;
  int *ts = NULL;
  gboolean ok = FALSE;

  if (!cli_parse ("schedule", "", "Print the sampling timesteps as rows of "
                  "\"index timestep alpha_bar sigma\", sigma = sqrt ((1 - "
                  "alpha_bar) / alpha_bar) the noise level that "
                  "--guidance-interval is given in.", entries, &argc, &argv,
                  &error))
    goto out;
  if (kind_name && !df_beta_schedule_parse (kind_name, &kind))
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--beta-schedule %s: give linear, scaled_linear or cosine",
                   kind_name);
      goto out;
    }
  if (spacing_name && !df_spacing_parse (spacing_name, &spacing))
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--spacing %s: give leading, trailing or linspace",
                   spacing_name);
      goto out;
    }
  if (model_path && kind_name)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "schedule: give --model or --beta-schedule, not both");
      goto out;
    }
  if (model_path && T != CLI_INT_UNSET)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "schedule: give --model or --timesteps, not both (the "
                   "model's schedule has its own T)");
      goto out;
    }
  if (T == CLI_INT_UNSET)
    T = 1000;
  if (T < 1)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--timesteps %d: give at least 1", T);
      goto out;
    }
  if (steps < 1)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--steps %d: give at least 1 step", steps);
      goto out;
    }

  if (model_path)
    {
      m = cli_load_model (model_path, CLI_UNET_FILE, &error);
      if (m == NULL)
        goto out;
      sch = df_model_schedule (m);
    }
  else
    {
      own = df_schedule_new (kind, T, 0, 0, &error);
      if (own == NULL)
        goto out;
      sch = own;
    }
  if (steps > sch->T)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--steps %d: the schedule has %d timesteps, give 1 to %d",
                   steps, sch->T, sch->T);
      goto out;
    }

  ts = g_new (int, steps);
  if (!df_schedule_timesteps (sch, steps, spacing, ts, &error))
    goto out;
  printf ("# %s, T %d, %d steps, %s spacing\n"
          "# index timestep alpha_bar sigma\n",
          df_beta_schedule_name (sch->kind), sch->T, steps,
          df_spacing_name (spacing));
  for (int i = 0; i < steps; i++)
    {
      double ab = sch->alphas_cumprod[ts[i]];

      /* sigma exactly, so that a bound copied from it falls where it
       * shows */
      printf ("%d %d %.9g %.17g\n", i, ts[i], ab, sqrt ((1 - ab) / ab));
    }
  ok = TRUE;

out:
  g_free (ts);
  if (own)
    df_schedule_free (own);
  if (m)
    df_model_free (m);
  g_free (model_path);
  g_free (kind_name);
  g_free (spacing_name);
  return ok ? 0 : cli_fail (error);
}

/* ---- eps ---- */

int
cli_eps (int argc, char **argv)
{
  char *model_path = NULL, *input = NULL, *output = NULL, *class_name = NULL;
  int t = -1, threads = 0;
  GOptionEntry entries[] = {
    { "model", 'm', 0, G_OPTION_ARG_FILENAME, &model_path,
      "UNet file (default: the shipped Fashion-MNIST UNet)", "PATH" },
    { "input", 'i', 0, G_OPTION_ARG_FILENAME, &input,
      "x_t as a float32 N,C,H,W .npy file", "X.npy" },
    { "t", 't', 0, G_OPTION_ARG_INT, &t, "Timestep, 0 to T-1", "T" },
    { "class", 'c', 0, G_OPTION_ARG_STRING, &class_name,
      "Class name or index: a name is matched first, then an index "
      "(default: the unconditional class)", "CLASS" },
    { "output", 'o', 0, G_OPTION_ARG_FILENAME, &output,
      "Where to write eps as float32 .npy", "EPS.npy" },
    { "threads", 'j', 0, G_OPTION_ARG_INT, &threads,
      "Threads (default 0: all cores)", "N" },
    { NULL }
  };
  GError *error = NULL;
  DfModel *m = NULL;
  float *x = NULL, *eps = NULL;
  int *labels = NULL, shape[4], oshape[4], label = -1;
  GBytes *bytes = NULL;
  gboolean ok = FALSE;

  if (!cli_parse ("eps", "", "Evaluate the UNet's noise prediction once.",
                  entries, &argc, &argv, &error))
    goto out;
  if (input == NULL || output == NULL)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "eps: give --input X.npy and --output EPS.npy");
      goto out;
    }
  if (t < 0)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "eps: give the timestep with --t T (0 to T-1)");
      goto out;
    }
  if (threads < 0 || threads > DF_MAX_THREADS)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--threads %d: give 0 (all cores) to %d", threads,
                   DF_MAX_THREADS);
      goto out;
    }
  if (!cli_check_output_file ("--output", output, &error))
    goto out;
  x = cli_npy_read (input, shape, &error);    /* [N,C,H,W] */
  if (x == NULL)
    goto out;

  df_set_threads (threads);
  m = cli_load_model (model_path, CLI_UNET_FILE, &error);
  if (m == NULL)
    goto out;
  if (df_model_is_classifier (m))
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s is a classifier: eps needs a diffusion model",
                   df_model_path (m));
      goto out;
    }
  if (t >= df_model_schedule (m)->T)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--t %d: %s has timesteps 0 to %d", t, df_model_path (m),
                   df_model_schedule (m)->T - 1);
      goto out;
    }
  if (shape[1] != df_model_channels (m) || shape[2] != df_model_size (m)
      || shape[3] != df_model_size (m))
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s: shape (%d, %d, %d, %d) does not fit %s, which takes "
                   "(N, %d, %d, %d)", input, shape[0], shape[1], shape[2],
                   shape[3], df_model_path (m), df_model_channels (m),
                   df_model_size (m), df_model_size (m));
      goto out;
    }

  /* Without --class a conditional model sees its unconditional class. */
  if (class_name && !cli_parse_class (m, class_name, &label, &error))
    goto out;
  if (label < 0 && df_model_num_classes (m) > 0)
    {
      label = df_model_uncond_class (m);
      if (label < 0)
        {
          g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                       "eps: %s is class-conditional without an "
                       "unconditional class: give --class",
                       df_model_path (m));
          goto out;
        }
    }
  if (label >= 0)
    {
      labels = g_new (int, shape[0]);
      for (int i = 0; i < shape[0]; i++)
        labels[i] = label;
    }

  oshape[0] = shape[0];
  oshape[1] = df_unet_config (df_model_net (m))->out_channels;
  oshape[2] = shape[2];
  oshape[3] = shape[3];
  eps = g_new (float, (gsize) oshape[0] * oshape[1] * oshape[2] * oshape[3]);
  if (!df_model_eps (m, x, shape[0], t, labels, eps, &error))
    goto out;
  bytes = cli_npy_encode (eps, oshape);
  ok = g_file_set_contents_full (output, g_bytes_get_data (bytes, NULL),
                                 g_bytes_get_size (bytes),
                                 G_FILE_SET_CONTENTS_CONSISTENT, 0644, &error);
  if (!ok)
    {
      cli_error_restore_path (error, output);
      g_prefix_error (&error, "eps: ");
    }

out:
  if (bytes)
    g_bytes_unref (bytes);
  g_free (labels);
  g_free (eps);
  g_free (x);
  if (m)
    df_model_free (m);
  g_free (model_path);
  g_free (input);
  g_free (output);
  g_free (class_name);
  return ok ? 0 : cli_fail (error);
}

/* ---- main ---- */

typedef struct {
  const char *name;
  int       (*run) (int argc, char **argv);
  const char *what;
} Command;

static const Command commands[] = {
  { "generate", cli_generate, "sample images into a folder of PNGs and a grid" },
  { "interpolate", cli_interpolate, "frames between two seeds, and a strip" },
  { "info", cli_info, "a model's config, parameters, classes, schedule; BLAS" },
  { "schedule", cli_schedule, "the sampling timesteps and alpha_bar" },
  { "eps", cli_eps, "one noise prediction, .npy in and out" },
  { "train", cli_train, "train a UNet or a noisy classifier on images" },
  { "eval", cli_eval, "class accuracy and Frechet distance of samples" },
};

static void
print_commands (FILE *f)
{
  fprintf (f, "Usage: diffuse COMMAND [OPTION...]\n\n"
           "Denoising diffusion models: sampling, training, evaluation.\n\n"
           "Commands:\n");
  for (gsize i = 0; i < G_N_ELEMENTS (commands); i++)
    fprintf (f, "  %-12s %s\n", commands[i].name, commands[i].what);
  fprintf (f, "\nRun 'diffuse COMMAND --help' for a command's options.\n");
}

int
main (int argc, char **argv)
{
  const char *name;

  /* The character set only: numbers print and parse the C way. */
  setlocale (LC_CTYPE, "");

  /* Before any thread starts, so every thread inherits the signal mask. */
  cli_cancellable ();

  /* No command is a mistake (status 1); asking for help is not. */
  if (argc < 2)
    {
      print_commands (stderr);
      return 1;
    }
  if (strcmp (argv[1], "--help") == 0
      || strcmp (argv[1], "-h") == 0 || strcmp (argv[1], "help") == 0)
    {
      if (argc >= 3 && strcmp (argv[1], "help") == 0)
        {
          /* "diffuse help generate" is "diffuse generate --help". */
          char *args[] = { argv[2], (char *) "--help", NULL };
          for (gsize i = 0; i < G_N_ELEMENTS (commands); i++)
            if (strcmp (commands[i].name, argv[2]) == 0)
              return commands[i].run (2, args);
          return cli_failf ("unknown command '%s' (run diffuse --help for "
                            "the list)", argv[2]);
        }
      print_commands (stdout);
      return 0;
    }
  if (strcmp (argv[1], "--version") == 0)
    {
      printf ("diffuse %s\n", DF_VERSION);
      return 0;
    }

  name = argv[1];
  for (gsize i = 0; i < G_N_ELEMENTS (commands); i++)
    if (strcmp (commands[i].name, name) == 0)
      return commands[i].run (argc - 1, argv + 1);
  return cli_failf ("unknown command '%s' (run diffuse --help for the list)",
                    name);
}
