/* eval.c: `diffuse eval`: how recognisable and how varied the samples of a
 * class-conditional UNet are, measured with the noisy classifier at t = 0.
 *
 * Accuracy: the classifier's argmax against the class asked for.  Frechet
 * distance: Gaussian fits of the classifier's penultimate features of the
 * samples and of the test set; the same distance between 10,000 training
 * images and the test set is the floor a perfect model would reach.  The
 * floor means something only if the test images are not the training
 * images: an IDX folder has both splits, a folder of class folders has one,
 * so it needs --test-data.
 */
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "dataset.h"
#include "fid.h"

#define EVAL_CHUNK 100     /* images per classifier forward pass */

/* Mean and covariance of the features of x[N,C,H,W]. */
static gboolean
feature_stats (DfFeatures *feat, const float *x, int n, gsize image,
               double *mu, double *cov, CliProgress *progress, GError **error)
{
  int d = df_features_dim (feat);
  float *f = g_new (float, (gsize) n * d);      /* [N,D] */
  gboolean ok = TRUE;

  for (int i = 0; i < n && ok; i += EVAL_CHUNK)
    {
      int b = MIN (EVAL_CHUNK, n - i);
      ok = df_features_compute (feat, x + i * image, b, 0, f + (gsize) i * d,
                                error);
      if (ok && g_cancellable_set_error_if_cancelled (cli_cancellable (), error))
        ok = FALSE;
      cli_progress_step (progress);
    }
  if (ok)
    df_feature_stats (f, n, d, mu, cov);
  g_free (f);
  return ok;
}

/* n training images as the samples are spread: class j's first n / k (one
 * more for j < n % k) in the data's order, topped up in order from the
 * rest where a class has too few.  The first n images of the data would
 * carry its chance class mix (the first 5,000 of Fashion-MNIST hold 457
 * T-shirts and 556 trousers), which moves the floor as much as the
 * sample count does. */
static float *
balanced_pick (const DfDataset *d, int n, int k, gsize image)
{
  float *out = g_new (float, (gsize) n * image);
  gboolean *used = g_new0 (gboolean, d->n);
  int *want = g_new0 (int, MAX (k, 1));
  int got = 0;

  for (int j = 0; j < k; j++)
    want[j] = n / k + (j < n % k);
  for (int i = 0; i < d->n && got < n; i++)
    {
      int y = d->labels[i];

      if (y >= 0 && y < k && want[y] > 0)
        {
          want[y]--;
          used[i] = TRUE;
          memcpy (out + (gsize) got++ * image, d->images + (gsize) i * image,
                  image * sizeof (float));
        }
    }
  for (int i = 0; i < d->n && got < n; i++)
    if (!used[i])
      memcpy (out + (gsize) got++ * image, d->images + (gsize) i * image,
              image * sizeof (float));
  g_free (want);
  g_free (used);
  return out;
}

/* Where the training and the test images come from, before anything is
 * loaded: a folder of class folders is one set of images, so the test set
 * must be another. */
static gboolean
check_data (const char *data_dir, const char *test_dir, GError **error)
{
  gboolean idx;

  if (!cli_check_folder ("--data", data_dir, error)
      || (test_dir && !cli_check_folder ("--test-data", test_dir, error)))
    return FALSE;
  idx = cli_is_idx_folder (data_dir, "train");
  if (test_dir == NULL && !idx)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "eval: --data %s is a folder of images, the training set "
                   "only: give images the model did not train on with "
                   "--test-data DIR (the floor compares the two sets)",
                   data_dir);
      return FALSE;
    }
  if (test_dir == NULL && !cli_is_idx_folder (data_dir, "t10k"))
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "eval: --data %s has no t10k-images-idx3-ubyte[.gz] (the "
                   "test split): give the test images with --test-data DIR",
                   data_dir);
      return FALSE;
    }
  if (test_dir && !cli_is_idx_folder (test_dir, "t10k"))
    {
      /* Then df_dataset_load reads every image of test_dir. */
      if (cli_same_file (data_dir, test_dir))
        {
          g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                       "eval: --test-data %s is the --data folder: give test "
                       "images the model did not train on", test_dir);
          return FALSE;
        }
    }
  return TRUE;
}

/* The classes of a loaded data set against the model's.  A folder's
 * classes are its class folders; IDX files hold labels, and at least 10
 * classes whatever they use, so there each label must be a class of the
 * model and names are compared only when the counts agree. */
static gboolean
check_data_classes (const char *option, const char *dir, gboolean idx,
                    const DfDataset *d, DfModel *m, GError **error)
{
  int k = df_model_num_classes (m);
  char *what;
  gboolean ok;

  if (idx)
    {
      for (int i = 0; i < d->n; i++)
        if (d->labels[i] >= k)
          {
            g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                         "%s %s: image %d has label %d, but the model %s "
                         "has classes 0 to %d", option, dir, i,
                         d->labels[i], df_model_path (m), k - 1);
            return FALSE;
          }
      if (d->num_classes != k)
        return TRUE;
    }
  what = g_strdup_printf ("%s %s", option, dir);
  ok = df_model_check_classes (m, what, d->num_classes,
                          (const char *const *) d->class_names, error);
  g_free (what);
  return ok;
}

int
cli_eval (int argc, char **argv)
{
  char *model_path = NULL, *classifier_path = NULL, *data_dir = NULL;
  char *test_dir = NULL, *seed_str = NULL, *interval_str = NULL;
  int count = 1000, steps = 50, batch = 25, threads = 0;
  int n_train = CLI_INT_UNSET, n_test = 0;
  double scale = CLI_DOUBLE_UNSET;
  gboolean quiet = FALSE, same_n = FALSE, scale_given;
  GOptionEntry entries[] = {
    { "model", 'm', 0, G_OPTION_ARG_FILENAME, &model_path,
      "Class-conditional UNet (default: the shipped one)", "PATH" },
    { "classifier", 0, 0, G_OPTION_ARG_FILENAME, &classifier_path,
      "Noisy classifier (default: the shipped one)", "PATH" },
    { "data", 'd', 0, G_OPTION_ARG_FILENAME, &data_dir,
      "Training images: an IDX folder, whose t10k files are the test set "
      "(default /usr/share/datasets/fashion-mnist), or a folder of class "
      "folders (then give --test-data)", "DIR" },
    { "test-data", 0, 0, G_OPTION_ARG_FILENAME, &test_dir,
      "Test images: a folder of class folders or an IDX folder's t10k files "
      "(default: --data's t10k files)", "DIR" },
    { "count", 'n', 0, G_OPTION_ARG_INT, &count,
      "Samples, spread evenly over the classes, at least one a class "
      "(default 1000)", "N" },
    { "steps", 's', 0, G_OPTION_ARG_INT, &steps,
      "DDIM steps, eta 0 (default 50)", "N" },
    { "guidance-scale", 0, 0, G_OPTION_ARG_DOUBLE, &scale,
      "Classifier-free guidance scale (default 3)", "S" },
    { "guidance-interval", 0, 0, G_OPTION_ARG_STRING, &interval_str,
      "Guide only at noise levels sigma in (LOW, HIGH]; 0,inf guides every "
      "step (default " DF_FREE_GUIDE_TEXT ")", "LOW,HIGH" },
    { "seed", 0, 0, G_OPTION_ARG_STRING, &seed_str,
      "Seed of class 0; class k uses seed + k (default 0)", "N" },
    { "batch", 'b', 0, G_OPTION_ARG_INT, &batch,
      "Samples per forward pass (default 25)", "N" },
    { "train-count", 0, 0, G_OPTION_ARG_INT, &n_train,
      "Training images for the floor (default 10000, or all if fewer)", "N" },
    { "test-count", 0, 0, G_OPTION_ARG_INT, &n_test,
      "Test images compared against (default 0: all)", "N" },
    { "threads", 'j', 0, G_OPTION_ARG_INT, &threads,
      "Threads (default 0: all cores)", "N" },
    { "quiet", 'q', 0, G_OPTION_ARG_NONE, &quiet, "No progress line", NULL },
    { NULL }
  };
  GError *error = NULL;
  DfModel *m = NULL, *cls = NULL;
  DfDataset *test = NULL, *train = NULL;
  DfFeatures *feat = NULL;
  DfSampleParams p;
  CliProgress progress;
  float *samples = NULL, *logits = NULL;
  int *correct = NULL, *asked = NULL;
  double *mu_s = NULL, *cov_s = NULL, *mu_t = NULL, *cov_t = NULL;
  double *mu_r = NULL, *cov_r = NULL, *mu_c = NULL, *cov_c = NULL;
  float *floor_x = NULL, *same_x = NULL;
  guint64 seed = 0;
  gboolean ok = FALSE;
  int k, c, s, d, hits = 0, guided;
  gsize image;

  if (!cli_parse ("eval", "", "Class accuracy (by the classifier at t = 0) "
                  "and Frechet distance in its features of guided samples, "
                  "beside the floor of real training images.",
                  entries, &argc, &argv, &error))
    goto out;

  /* Options, then models, then data. */
  scale_given = scale != CLI_DOUBLE_UNSET;
  if (!scale_given)
    scale = 3.0;
  if (count < 2 || steps < 1 || batch < 1
      || (n_train != CLI_INT_UNSET && n_train < 2) || threads < 0
      || threads > DF_MAX_THREADS
      || n_test < 0 || n_test == 1
      || !(scale >= 0 && scale <= DF_GUIDE_SCALE_MAX))
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID, "eval: %s",
                   count < 2 ? "--count: give at least 2 samples"
                   : steps < 1 ? "--steps: give at least 1"
                   : batch < 1 ? "--batch: give at least 1"
                   : n_train != CLI_INT_UNSET && n_train < 2
                   ? "--train-count: give at least 2"
                   : threads < 0 || threads > DF_MAX_THREADS
                   ? "--threads: give 0 (all cores) to " G_STRINGIFY (DF_MAX_THREADS)
                   : n_test < 0 || n_test == 1
                   ? "--test-count: give 0 (all) or at least 2"
                   : "--guidance-scale: use 0..100 (0 unconditional, 1 "
                     "conditional, more guides harder)");
      goto out;
    }
  if (seed_str && !cli_parse_u64 ("--seed", seed_str, &seed, &error))
    goto out;
  df_sample_params_init (&p);
  if (scale != 0.0)
    {
      p.guide_lo = DF_FREE_GUIDE_LO;
      p.guide_hi = DF_FREE_GUIDE_HI;
    }
  if (interval_str
      && !cli_parse_interval ("--guidance-interval", interval_str,
                              &p.guide_lo, &p.guide_hi, &error))
    goto out;
  if (data_dir == NULL)
    data_dir = g_strdup ("/usr/share/datasets/fashion-mnist");
  if (!check_data (data_dir, test_dir, &error))
    goto out;

  df_set_threads (threads);
  m = cli_load_model (model_path, CLI_UNET_FILE, &error);
  if (m == NULL)
    goto out;
  cls = cli_load_model (classifier_path, CLI_CLASSIFIER_FILE, &error);
  if (cls == NULL)
    goto out;
  k = df_model_num_classes (m);
  c = df_model_channels (m);
  s = df_model_size (m);
  image = (gsize) c * s * s;
  if (df_model_is_classifier (m) || k <= 0 || df_model_uncond_class (m) < 0)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "eval: %s is not a class-conditional UNet with an "
                   "unconditional class", df_model_path (m));
      goto out;
    }
  if (!df_model_is_classifier (cls) || df_model_channels (cls) != c
      || df_model_size (cls) != s)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "eval: %s is not a noisy classifier for %s (%d x %d x %d "
                   "images)", df_model_path (cls), df_model_path (m), c, s,
                   s);
      goto out;
    }
  /* Accuracy counts the classifier's argmax as the model's class. */
  if (!df_model_check_classifier (m, cls, "--classifier", &error))
    goto out;
  if (count < k)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "eval: --count %d is fewer than the %d classes of %s: "
                   "give at least %d (the samples are spread evenly over the "
                   "classes)", count, k, df_model_path (m), k);
      goto out;
    }
  if (steps > df_model_schedule (m)->T)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--steps %d: %s has %d timesteps", steps,
                   df_model_path (m), df_model_schedule (m)->T);
      goto out;
    }
  p.steps = steps;
  p.guidance = DF_GUIDANCE_FREE;
  p.scale = scale;
  /* Its report gives the guided steps ("0 of the N"): no note. */
  if (!cli_check_guidance_acts (df_model_schedule (m), &p, interval_str,
                                scale_given, FALSE, &error))
    goto out;
  guided = df_sample_guided_steps (df_model_schedule (m), &p);
  feat = df_features_new (cls, &error);
  if (feat == NULL)
    goto out;
  d = df_features_dim (feat);

  test = df_dataset_load (test_dir ? test_dir : data_dir, "test", s, c,
                          &error);
  if (test == NULL
      || !check_data_classes (test_dir ? "--test-data" : "--data",
                              test_dir ? test_dir : data_dir,
                              cli_is_idx_folder (test_dir ? test_dir
                                                 : data_dir, "t10k"),
                              test, m, &error))
    goto out;
  train = df_dataset_load (data_dir, "train", s, c, &error);
  if (train == NULL
      || !check_data_classes ("--data", data_dir,
                              cli_is_idx_folder (data_dir, "train"), train, m,
                              &error))
    goto out;

  /* A count above what the data holds is a mistake, not a wish for all. */
  if (n_train != CLI_INT_UNSET && n_train > train->n)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--train-count %d: %s holds %d training images; give 2 "
                   "to %d", n_train, data_dir, train->n, train->n);
      goto out;
    }
  if (n_test > test->n)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--test-count %d: %s holds %d test images; give 2 to %d, "
                   "or 0 for all", n_test, test_dir ? test_dir : data_dir,
                   test->n, test->n);
      goto out;
    }
  if (train->n < 2 || test->n < 2)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "eval: %s holds %d %s image%s: the Frechet distance needs "
                   "at least 2", train->n < 2 ? data_dir
                   : test_dir ? test_dir : data_dir,
                   train->n < 2 ? train->n : test->n,
                   train->n < 2 ? "training" : "test",
                   (train->n < 2 ? train->n : test->n) == 1 ? "" : "s");
      goto out;
    }
  if (n_train == CLI_INT_UNSET)
    n_train = MIN (10000, train->n);
  if (n_test == 0)
    n_test = test->n;

  /* Samples: class j gets count / k, the first count % k one more. */
  samples = g_new (float, (gsize) count * image);   /* [count,C,H,W] */
  asked = g_new (int, count);                       /* [count] */
  cli_progress_init (&progress, "eval: sampling", 0, quiet);
  for (int j = 0; j < k; j++)
    {
      int nj = count / k + (j < count % k);
      progress.total += steps * ((nj + batch - 1) / batch);
    }
  for (int j = 0, first = 0; j < k; j++)
    {
      int nj = count / k + (j < count % k);

      if (nj == 0)
        continue;
      p.label = j;
      p.seed = seed + j;
      if (!df_model_generate (m, NULL, &p, nj, MIN (batch, nj),
                              samples + first * image, cli_progress_sampler,
                              &progress, cli_cancellable (), &error))
        {
          cli_progress_finish (&progress);
          goto out;
        }
      for (int i = 0; i < nj; i++)
        asked[first + i] = j;
      first += nj;
    }
  cli_progress_finish (&progress);

  /* Accuracy at t = 0. */
  logits = g_new (float, (gsize) EVAL_CHUNK * k);   /* [chunk,K] */
  correct = g_new0 (int, k);
  for (int i = 0; i < count; i += EVAL_CHUNK)
    {
      int b = MIN (EVAL_CHUNK, count - i);
      if (!df_model_logits (cls, samples + i * image, b, 0, logits, &error))
        goto out;
      for (int r = 0; r < b; r++)
        {
          int best = 0;
          for (int j = 1; j < k; j++)
            if (logits[r * k + j] > logits[r * k + best])
              best = j;
          if (best == asked[i + r])
            {
              hits++;
              correct[best]++;
            }
        }
    }

  /* Frechet distances in the penultimate features; with fewer samples
   * than floor images, also the floor at the sample count. */
  same_n = count < n_train;
  floor_x = balanced_pick (train, n_train, k, image);
  same_x = same_n ? balanced_pick (train, count, k, image) : NULL;
  mu_s = g_new (double, d);
  mu_t = g_new (double, d);
  mu_r = g_new (double, d);
  cov_s = g_new (double, (gsize) d * d);
  cov_t = g_new (double, (gsize) d * d);
  cov_r = g_new (double, (gsize) d * d);
  mu_c = g_new (double, d);
  cov_c = g_new (double, (gsize) d * d);
  cli_progress_init (&progress, "eval: features",
                     (count + EVAL_CHUNK - 1) / EVAL_CHUNK
                     + (n_test + EVAL_CHUNK - 1) / EVAL_CHUNK
                     + (n_train + EVAL_CHUNK - 1) / EVAL_CHUNK
                     + (same_n ? (count + EVAL_CHUNK - 1) / EVAL_CHUNK : 0),
                     quiet);
  ok = feature_stats (feat, samples, count, image, mu_s, cov_s, &progress,
                      &error)
    && feature_stats (feat, test->images, n_test, image, mu_t, cov_t,
                      &progress, &error)
    && feature_stats (feat, floor_x, n_train, image, mu_r, cov_r,
                      &progress, &error)
    && (!same_n
        || feature_stats (feat, same_x, count, image, mu_c, cov_c,
                          &progress, &error));
  cli_progress_finish (&progress);
  if (!ok)
    goto out;

  {
    double fd = df_frechet_distance (mu_s, cov_s, mu_t, cov_t, d);
    double floor_fd = df_frechet_distance (mu_r, cov_r, mu_t, cov_t, d);

    printf ("samples: %d over %d classes, DDIM %d steps, eta 0, "
            "classifier-free guidance scale %g", count, k, steps, scale);
    if (guided == steps)
      printf (" at every step");
    else
      printf (" at sigma in (%g, %g] (%d of the %d steps)", p.guide_lo,
              p.guide_hi, guided, steps);
    printf (", seed %" G_GUINT64_FORMAT "\n", seed);
    printf ("accuracy: %.2f%% (%d of %d asked classes by %s at t = 0)\n",
            100.0 * hits / count, hits, count, df_model_path (cls));
    for (int j = 0; j < k; j++)
      {
        int nj = count / k + (j < count % k);
        printf ("  %d %-16s %6.2f%% of %d\n", j,
                df_model_class_name (m, j) ? df_model_class_name (m, j) : "",
                nj ? 100.0 * correct[j] / nj : 0.0, nj);
      }
    printf ("frechet distance: %.6g (samples vs %d test images, %d features)\n",
            fd, n_test, d);
    printf ("frechet floor: %.6g (%d training images vs the test images; "
            "classes in the samples' proportions)\n", floor_fd, n_train);
    printf ("ratio: %.2f x the floor\n", floor_fd > 0 ? fd / floor_fd : INFINITY);
    if (same_n)
      {
        double same_fd = df_frechet_distance (mu_c, cov_c, mu_t, cov_t, d);

        /* Fewer images fit a noisier Gaussian, so the distance of a
         * perfect model's `count` samples is this, not the floor above. */
        printf ("frechet floor at the sample count: %.6g (%d training images "
                "vs the test images%s)\n", same_fd, count,
                count <= d ? "; no more images than features, so both "
                "covariances are singular and the distances rough" : "");
        printf ("ratio at the sample count: %.2f x\n",
                same_fd > 0 ? fd / same_fd : INFINITY);
      }
  }

out:
  g_free (mu_s);
  g_free (mu_t);
  g_free (mu_r);
  g_free (cov_s);
  g_free (cov_t);
  g_free (cov_r);
  g_free (mu_c);
  g_free (cov_c);
  g_free (floor_x);
  g_free (same_x);
  g_free (correct);
  g_free (logits);
  g_free (asked);
  g_free (samples);
  df_features_free (feat);
  if (train)
    df_dataset_free (train);
  if (test)
    df_dataset_free (test);
  if (cls)
    df_model_free (cls);
  if (m)
    df_model_free (m);
  g_free (model_path);
  g_free (classifier_path);
  g_free (data_dir);
  g_free (test_dir);
  g_free (seed_str);
  g_free (interval_str);
  return ok ? 0 : cli_fail (error);
}
