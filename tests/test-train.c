/* test-train.c: the trainer resumes bit for bit, a failed checkpoint write
 * leaves the previous one intact, the log and plot are written, and (slow
 * suite, as test-train-slow) a tiny UNet and classifier learn.
 *
 * Data: 8x8 gray images of two classes, "top" (bright top half) and
 * "bottom" (bright bottom half), with a little per-image variation.
 */
#include <gdk-pixbuf/gdk-pixbuf.h>
#include <glib/gstdio.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "model.h"
#include "rng.h"
#include "safetensors.h"
#include "train.h"

#define SIZE 8

/* Mean loss of the last 50 of 300 steps (train_for).  Measured 0.0389 for
 * the UNet (0.896 over the first 10 steps) and 0.298 for the classifier
 * (0.554; chance is ln 2 = 0.693); the bounds leave room for other BLAS
 * kernels' rounding. */
#define UNET_LOSS_BOUND       0.08
#define CLASSIFIER_LOSS_BOUND 0.45

static const char *const class_names[] = { "top", "bottom", NULL };

/* ---- fixtures ---- */

static DfDataset *
halves_dataset (int n)
{
  DfDataset *d = g_new0 (DfDataset, 1);
  float *jitter = g_new (float, SIZE * SIZE);

  d->n = n;
  d->c = 1;
  d->h = d->w = SIZE;
  d->images = g_new (float, n * SIZE * SIZE);
  d->labels = g_new (int, n);
  d->num_classes = 2;
  d->class_names = g_strdupv ((char **) class_names);
  for (int i = 0; i < n; i++)
    {
      float *img = d->images + i * SIZE * SIZE;   /* [H,W] */

      d->labels[i] = i % 2;
      df_rng_uniform (1234, i, 0, jitter, SIZE * SIZE);
      for (int y = 0; y < SIZE; y++)
        for (int x = 0; x < SIZE; x++)
          {
            gboolean bright = (y < SIZE / 2) == (d->labels[i] == 0);
            float v = bright ? 0.8f : -0.8f;

            img[y * SIZE + x] = v + 0.2f * (jitter[y * SIZE + x] - 0.5f);
          }
    }
  g_free (jitter);
  return d;
}

static void
tiny_config (DfUNetConfig *cfg, int c0, int c1)
{
  df_unet_config_init (cfg);
  cfg->sample_size = SIZE;
  cfg->in_channels = cfg->out_channels = 1;
  cfg->n_blocks = 2;
  cfg->block_out_channels[0] = c0;
  cfg->block_out_channels[1] = c1;
  for (int i = 0; i < DF_MAX_BLOCKS; i++)
    cfg->down_attention[i] = cfg->up_attention[i] = FALSE;
  cfg->layers_per_block = 1;
  cfg->norm_num_groups = 8;
  cfg->mid_attention = TRUE;
  cfg->attention_head_dim = 8;
}

/* A class-conditional UNet (uncond class 2) or a 2-class classifier. */
static DfModel *
tiny_model (gboolean classifier, int c0, int c1, guint64 init_seed)
{
  DfUNetConfig cfg;
  DfSchedule *s;
  DfModel *m;
  GError *error = NULL;

  tiny_config (&cfg, c0, c1);
  if (classifier)
    cfg.classifier_classes = 2;
  else
    cfg.num_class_embeds = 3;
  s = df_schedule_new (DF_BETA_LINEAR, 1000, 0, 0, &error);
  g_assert_no_error (error);
  m = df_model_new (&cfg, classifier, s, class_names, classifier ? -1 : 2,
                    &error);
  g_assert_no_error (error);
  g_assert_nonnull (m);
  df_schedule_free (s);
  df_unet_init (df_model_net (m), init_seed);
  return m;
}

static void
test_options (DfTrainOptions *o, const char *checkpoint, int steps)
{
  df_train_options_init (o);
  o->steps = steps;
  o->batch = 4;
  o->lr = 1e-3;
  o->warmup = 2;
  o->lr_schedule = DF_LR_COSINE;
  o->weight_decay = 0.01;
  o->ema_decay = 0.99;
  o->grad_clip = 0.5;          /* small enough to clip */
  o->p_uncond = 0.3;
  o->hflip = TRUE;
  o->seed = 7;
  o->checkpoint = checkpoint;
  o->checkpoint_minutes = 0;
}

static DfTrainer *
new_trainer (DfModel *m, const DfDataset *d, const DfTrainOptions *o)
{
  GError *error = NULL;
  DfTrainer *t = df_trainer_new (m, d, o, &error);

  g_assert_no_error (error);
  g_assert_nonnull (t);
  return t;
}

static void
run_steps (DfTrainer *t, int n, double *last_loss)
{
  GError *error = NULL;

  for (int i = 0; i < n; i++)
    {
      g_assert_true (df_trainer_step (t, last_loss, &error));
      g_assert_no_error (error);
      g_assert_true (isfinite (*last_loss));
    }
}

static void
rm_rf (const char *path)
{
  GDir *d = g_dir_open (path, 0, NULL);

  if (d != NULL)
    {
      const char *name;

      while ((name = g_dir_read_name (d)) != NULL)
        {
          char *child = g_build_filename (path, name, NULL);
          rm_rf (child);
          g_free (child);
        }
      g_dir_close (d);
    }
  g_remove (path);
}

/* Every tensor of two safetensors files, byte for byte: the number that
 * differ, the worst absolute difference into *worst. */
static int
compare_files (const char *a, const char *b, double *worst)
{
  GError *error = NULL;
  DfSafetensors *sa = df_safetensors_open (a, &error);
  DfSafetensors *sb;
  char **names;
  int differ = 0, count = 0;

  g_assert_no_error (error);
  sb = df_safetensors_open (b, &error);
  g_assert_no_error (error);
  names = df_safetensors_names (sa);
  *worst = 0;
  for (int i = 0; names[i] != NULL; i++)
    {
      gint64 shape[8], n = 1;
      int ndim;
      float *va, *vb;

      g_assert_true (df_safetensors_shape (sa, names[i], &ndim, shape));
      for (int j = 0; j < ndim; j++)
        n *= shape[j];
      va = g_new (float, n);
      vb = g_new (float, n);
      g_assert_true (df_safetensors_read_f32 (sa, names[i], ndim, shape, va,
                                              &error));
      g_assert_true (df_safetensors_read_f32 (sb, names[i], ndim, shape, vb,
                                              &error));
      g_assert_no_error (error);
      if (memcmp (va, vb, n * sizeof (float)) != 0)
        differ++;
      for (gint64 k = 0; k < n; k++)
        *worst = MAX (*worst, fabs ((double) va[k] - vb[k]));
      count++;
      g_free (va);
      g_free (vb);
    }
  g_strfreev (names);
  names = df_safetensors_names (sb);
  g_assert_cmpint (g_strv_length (names), ==, count);
  g_strfreev (names);
  df_safetensors_free (sa);
  df_safetensors_free (sb);
  return differ;
}

/* ---- resume ---- */

/* k steps, checkpoint, a fresh trainer resumes and does step k+1: the same
 * weights, EMA and Adam moments as k+1 steps in one go, bit for bit. */
static void
test_resume_bit_exact (void)
{
  const int k = 3;
  char *dir = g_dir_make_tmp ("df-train-XXXXXX", NULL);
  char *ck_a = g_build_filename (dir, "a.safetensors", NULL);
  char *ck_c = g_build_filename (dir, "c.safetensors", NULL);
  DfDataset *d = halves_dataset (32);
  DfTrainOptions o;
  DfModel *m;
  DfTrainer *t;
  GError *error = NULL;
  gboolean resumed;
  double loss_b, loss_c, worst;
  int differ, n_params;

  df_set_threads (1);

  /* A: k steps, then a checkpoint; the model is freed. */
  test_options (&o, ck_a, k + 1);
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  run_steps (t, k, &loss_b);
  g_assert_true (df_trainer_save_checkpoint (t, &error));
  g_assert_no_error (error);
  df_trainer_free (t);
  df_model_free (m);

  /* B: another initialisation, resumed from A, one step, saved over A. */
  o.resume = TRUE;
  m = tiny_model (FALSE, 16, 32, 999);
  t = new_trainer (m, d, &o);
  g_assert_true (df_trainer_resume (t, &resumed, &error));
  g_assert_no_error (error);
  g_assert_true (resumed);
  g_assert_cmpint (df_trainer_step_index (t), ==, k);
  run_steps (t, 1, &loss_b);
  g_assert_cmpint (df_trainer_step_index (t), ==, k + 1);
  g_assert_true (df_trainer_save_checkpoint (t, &error));
  df_trainer_free (t);
  df_model_free (m);

  /* C: k + 1 steps uninterrupted. */
  o.resume = FALSE;
  o.checkpoint = ck_c;
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  run_steps (t, k + 1, &loss_c);
  g_assert_true (df_trainer_save_checkpoint (t, &error));
  df_unet_params (df_model_net (m), &n_params);
  df_trainer_free (t);
  df_model_free (m);

  differ = compare_files (ck_a, ck_c, &worst);
  g_test_message ("step %d loss %.9g resumed, %.9g uninterrupted; %d of %d "
                  "tensors differ, worst %g", k + 1, loss_b, loss_c, differ,
                  4 * n_params, worst);
  g_assert_cmpfloat (loss_b, ==, loss_c);
  g_assert_cmpint (differ, ==, 0);

  df_dataset_free (d);
  rm_rf (dir);
  g_free (ck_a);
  g_free (ck_c);
  g_free (dir);
}

/* Two threads give the same steps as one, bit for bit. */
static void
test_threads_bit_identical (void)
{
  char *dir = g_dir_make_tmp ("df-train-XXXXXX", NULL);
  char *ck1 = g_build_filename (dir, "1.safetensors", NULL);
  char *ck2 = g_build_filename (dir, "2.safetensors", NULL);
  DfDataset *d = halves_dataset (32);
  DfTrainOptions o;
  GError *error = NULL;
  double loss[2], worst;
  int differ;

  for (int k = 0; k < 2; k++)
    {
      DfModel *m;
      DfTrainer *t;

      df_set_threads (k + 1);
      test_options (&o, k == 0 ? ck1 : ck2, 3);
      o.batch = 8;
      m = tiny_model (FALSE, 16, 32, 11);
      t = new_trainer (m, d, &o);
      run_steps (t, 3, &loss[k]);
      g_assert_true (df_trainer_save_checkpoint (t, &error));
      g_assert_no_error (error);
      df_trainer_free (t);
      df_model_free (m);
    }
  df_set_threads (1);
  differ = compare_files (ck1, ck2, &worst);
  g_test_message ("loss %.9g with 1 thread, %.9g with 2; %d tensors differ, "
                  "worst %g", loss[0], loss[1], differ, worst);
  g_assert_cmpint (differ, ==, 0);

  df_dataset_free (d);
  rm_rf (dir);
  g_free (ck1);
  g_free (ck2);
  g_free (dir);
}

/* The options change nothing when they are the same: a different seed
 * gives a different step (so the test above could fail). */
static void
test_seed_matters (void)
{
  DfDataset *d = halves_dataset (32);
  DfTrainOptions o;
  DfModel *m;
  DfTrainer *t;
  double a, b;

  df_set_threads (1);
  test_options (&o, NULL, 2);
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  run_steps (t, 1, &a);
  df_trainer_free (t);
  df_model_free (m);

  o.seed = 8;
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  run_steps (t, 1, &b);
  df_trainer_free (t);
  df_model_free (m);
  g_test_message ("first loss %.9g with seed 7, %.9g with seed 8", a, b);
  g_assert_cmpfloat (a, !=, b);
  df_dataset_free (d);
}

/* ---- checkpoint failures ---- */

/* A write that fails midway (the file size limit cuts it) returns an error
 * and leaves the previous checkpoint as it was, loadable. */
static void
test_checkpoint_failure (void)
{
  char *dir = g_dir_make_tmp ("df-train-XXXXXX", NULL);
  char *ck = g_build_filename (dir, "ck.safetensors", NULL);
  DfDataset *d = halves_dataset (16);
  DfTrainOptions o;
  DfModel *m;
  DfTrainer *t;
  GError *error = NULL;
  char *before, *after;
  gsize len_before, len_after;
  struct rlimit old, cut;
  void (*old_handler) (int);
  gboolean ok, resumed;
  double loss;
  GDir *gd;
  const char *name;

  test_options (&o, ck, 10);
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  run_steps (t, 2, &loss);
  g_assert_true (df_trainer_save_checkpoint (t, &error));
  g_assert_no_error (error);
  g_assert_true (g_file_get_contents (ck, &before, &len_before, NULL));

  /* Step 3's write stops at half the size: write() fails with EFBIG. */
  run_steps (t, 1, &loss);
  old_handler = signal (SIGXFSZ, SIG_IGN);
  g_assert_cmpint (getrlimit (RLIMIT_FSIZE, &old), ==, 0);
  cut = old;
  cut.rlim_cur = len_before / 2;
  g_assert_cmpint (setrlimit (RLIMIT_FSIZE, &cut), ==, 0);
  ok = df_trainer_save_checkpoint (t, &error);
  g_assert_cmpint (setrlimit (RLIMIT_FSIZE, &old), ==, 0);
  signal (SIGXFSZ, old_handler);
  g_assert_false (ok);
  g_assert_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT);
  g_test_message ("%s", error->message);
  g_assert_nonnull (strstr (error->message, ck));
  g_clear_error (&error);
  df_trainer_free (t);
  df_model_free (m);

  /* The old file, unchanged, resumes at step 2. */
  g_assert_true (g_file_get_contents (ck, &after, &len_after, NULL));
  g_assert_cmpuint (len_after, ==, len_before);
  g_assert_true (memcmp (before, after, len_before) == 0);
  o.resume = TRUE;
  m = tiny_model (FALSE, 16, 32, 5);
  t = new_trainer (m, d, &o);
  g_assert_true (df_trainer_resume (t, &resumed, &error));
  g_assert_no_error (error);
  g_assert_true (resumed);
  g_assert_cmpint (df_trainer_step_index (t), ==, 2);
  df_trainer_free (t);
  df_model_free (m);

  /* Leftovers of the failed write, for the record. */
  gd = g_dir_open (dir, 0, NULL);
  while ((name = g_dir_read_name (gd)) != NULL)
    g_test_message ("left in the folder: %s", name);
  g_dir_close (gd);

  df_dataset_free (d);
  rm_rf (dir);
  g_free (before);
  g_free (after);
  g_free (ck);
  g_free (dir);
}

/* A checkpoint of another configuration, or a file that is not a
 * checkpoint, is an error and leaves the trainer at step 0. */
static void
test_resume_mismatch (void)
{
  char *dir = g_dir_make_tmp ("df-train-XXXXXX", NULL);
  char *ck = g_build_filename (dir, "ck.safetensors", NULL);
  char *model_file = g_build_filename (dir, "model.safetensors", NULL);
  DfDataset *d = halves_dataset (16);
  DfTrainOptions o;
  DfModel *m;
  DfTrainer *t;
  GError *error = NULL;
  gboolean resumed = TRUE;
  double loss;

  test_options (&o, ck, 10);
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  run_steps (t, 1, &loss);
  g_assert_true (df_trainer_save_checkpoint (t, &error));
  g_assert_true (df_model_save (m, model_file, &error));
  g_assert_no_error (error);
  df_trainer_free (t);
  df_model_free (m);

  o.resume = TRUE;
  m = tiny_model (FALSE, 8, 16, 11);
  t = new_trainer (m, d, &o);
  g_assert_false (df_trainer_resume (t, &resumed, &error));
  g_assert_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT);
  g_test_message ("%s", error->message);
  g_assert_false (resumed);
  g_clear_error (&error);
  df_trainer_free (t);

  o.checkpoint = model_file;
  t = new_trainer (m, d, &o);
  g_assert_false (df_trainer_resume (t, &resumed, &error));
  g_assert_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT);
  g_test_message ("%s", error->message);
  g_assert_cmpint (df_trainer_step_index (t), ==, 0);
  g_clear_error (&error);
  df_trainer_free (t);
  df_model_free (m);

  df_dataset_free (d);
  rm_rf (dir);
  g_free (ck);
  g_free (model_file);
  g_free (dir);
}

/* ---- the loop ---- */

static void
count_progress (gpointer data, const DfTrainProgress *p)
{
  int *calls = data;

  g_assert_cmpint (p->step, ==, *calls + 1);
  g_assert_true (isfinite (p->smoothed_loss) && p->smoothed_loss > 0);
  g_assert_true (p->img_per_s > 0 && p->eta_seconds >= 0);
  (*calls)++;
}

static int
count_rows (const char *csv)
{
  char *text, **lines;
  int rows = 0;

  g_assert_true (g_file_get_contents (csv, &text, NULL, NULL));
  lines = g_strsplit (text, "\n", -1);
  g_assert_cmpstr (lines[0], ==, "step,loss,smoothed_loss,lr,img_per_s");
  for (int i = 1; lines[i] != NULL; i++)
    if (lines[i][0] != '\0')
      {
        g_assert_cmpint (atoi (lines[i]), ==, rows + 1);
        rows++;
      }
  g_strfreev (lines);
  g_free (text);
  return rows;
}

/* run(): progress per step, a CSV row per step (continued on resume),
 * the EMA weights in the output file and in the model, the plot. */
static void
test_run_log_output_plot (void)
{
  char *dir = g_dir_make_tmp ("df-train-XXXXXX", NULL);
  char *ck = g_build_filename (dir, "ck.safetensors", NULL);
  char *out = g_build_filename (dir, "out.safetensors", NULL);
  char *csv = g_build_filename (dir, "loss.csv", NULL);
  char *png = g_build_filename (dir, "loss.png", NULL);
  DfDataset *d = halves_dataset (16);
  DfTrainOptions o;
  DfModel *m, *saved;
  DfTrainer *t;
  GError *error = NULL;
  int calls = 0, n_params, n_saved;
  const DfParam *p, *q;
  gboolean resumed;
  GdkPixbuf *plot;

  test_options (&o, ck, 5);
  o.output = out;
  o.log_csv = csv;
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  g_assert_true (df_trainer_run (t, count_progress, &calls, NULL, &error));
  g_assert_no_error (error);
  g_assert_cmpint (calls, ==, 5);
  g_assert_cmpint (count_rows (csv), ==, 5);

  /* The output holds the EMA, which the model holds now too. */
  saved = df_model_load (out, &error);
  g_assert_no_error (error);
  p = df_unet_params (df_model_net (m), &n_params);
  q = df_unet_params (df_model_net (saved), &n_saved);
  g_assert_cmpint (n_params, ==, n_saved);
  for (int i = 0; i < n_params; i++)
    g_assert_true (memcmp (p[i].tensor->data, q[i].tensor->data,
                           p[i].tensor->size * sizeof (float)) == 0);
  g_assert_cmpint (df_model_uncond_class (saved), ==, 2);
  g_assert_cmpstr (df_model_class_name (saved, 1), ==, "bottom");
  df_model_free (saved);
  df_trainer_free (t);
  df_model_free (m);

  /* A checkpoint loads as a model too (its live weights). */
  saved = df_model_load (ck, &error);
  g_assert_no_error (error);
  df_model_free (saved);

  /* Rows past the checkpoint (a run killed after it) are redone: resume
   * to 8 steps and the log reads 1..8 once. */
  {
    FILE *f = fopen (csv, "a");
    fputs ("6,0.5,0.5,0.001,10\n7,0.5,0.5,0.001,10\n", f);
    fclose (f);
  }
  g_assert_cmpint (count_rows (csv), ==, 7);
  o.steps = 8;
  o.resume = TRUE;
  calls = 5;
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  g_assert_true (df_trainer_resume (t, &resumed, &error));
  g_assert_true (resumed);
  g_assert_true (df_trainer_run (t, count_progress, &calls, NULL, &error));
  g_assert_no_error (error);
  g_assert_cmpint (count_rows (csv), ==, 8);
  df_trainer_free (t);
  df_model_free (m);

  g_assert_true (df_train_plot_loss (csv, png, &error));
  g_assert_no_error (error);
  plot = gdk_pixbuf_new_from_file (png, &error);
  g_assert_no_error (error);
  g_assert_cmpint (gdk_pixbuf_get_width (plot), >, 300);
  g_object_unref (plot);

  /* A fresh run on the same log starts it again. */
  o.steps = 2;
  o.resume = FALSE;
  o.checkpoint = NULL;
  o.output = NULL;
  calls = 0;
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  g_assert_true (df_trainer_run (t, count_progress, &calls, NULL, &error));
  g_assert_cmpint (count_rows (csv), ==, 2);
  df_trainer_free (t);
  df_model_free (m);

  df_dataset_free (d);
  rm_rf (dir);
  g_free (ck);
  g_free (out);
  g_free (csv);
  g_free (png);
  g_free (dir);
}

/* Cancelling stops before the next step, saves and says so. */
static void
test_run_cancel (void)
{
  char *dir = g_dir_make_tmp ("df-train-XXXXXX", NULL);
  char *ck = g_build_filename (dir, "ck.safetensors", NULL);
  DfDataset *d = halves_dataset (16);
  DfTrainOptions o;
  DfModel *m;
  DfTrainer *t;
  GError *error = NULL;
  GCancellable *c = g_cancellable_new ();

  test_options (&o, ck, 5);
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  g_cancellable_cancel (c);
  g_assert_false (df_trainer_run (t, NULL, NULL, c, &error));
  g_assert_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CANCELLED);
  g_clear_error (&error);
  g_assert_cmpint (df_trainer_step_index (t), ==, 0);
  g_assert_true (g_file_test (ck, G_FILE_TEST_EXISTS));
  df_trainer_free (t);
  df_model_free (m);
  g_object_unref (c);

  df_dataset_free (d);
  rm_rf (dir);
  g_free (ck);
  g_free (dir);
}

/* Data that does not fit the model is refused before any step. */
static void
test_data_mismatch (void)
{
  DfDataset *d = halves_dataset (4);
  DfTrainOptions o;
  DfModel *m = tiny_model (FALSE, 16, 32, 11);
  GError *error = NULL;

  test_options (&o, NULL, 1);
  d->num_classes = 3;
  g_assert_null (df_trainer_new (m, d, &o, &error));
  g_assert_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID);
  g_test_message ("%s", error->message);
  g_clear_error (&error);
  d->num_classes = 2;
  d->h = d->w = 4;
  g_assert_null (df_trainer_new (m, d, &o, &error));
  g_assert_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID);
  g_test_message ("%s", error->message);
  g_clear_error (&error);
  d->h = d->w = SIZE;

  /* Output paths whose folder is missing fail now, not after the run. */
  test_options (&o, "/nonexistent-folder/run.ckpt", 1);
  g_assert_null (df_trainer_new (m, d, &o, &error));
  g_assert_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID);
  g_test_message ("%s", error->message);
  g_clear_error (&error);
  test_options (&o, NULL, 1);
  o.output = "/nonexistent-folder/model.safetensors";
  g_assert_null (df_trainer_new (m, d, &o, &error));
  g_assert_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID);
  g_clear_error (&error);
  df_model_free (m);
  df_dataset_free (d);
}

/* ---- resuming another run ---- */

/* A model like tiny_model (FALSE, 16, 32, 11) with one thing changed. */
static DfModel *
variant_model (int size, int groups, int head_dim, DfBetaSchedule kind, int T,
               double beta_end, const char *const *names)
{
  DfUNetConfig cfg;
  DfSchedule *s;
  DfModel *m;
  GError *error = NULL;

  tiny_config (&cfg, 16, 32);
  cfg.sample_size = size;
  cfg.norm_num_groups = groups;
  cfg.attention_head_dim = head_dim;
  cfg.num_class_embeds = 3;
  s = df_schedule_new (kind, T, 0, beta_end, &error);
  g_assert_no_error (error);
  m = df_model_new (&cfg, FALSE, s, names, 2, &error);
  g_assert_no_error (error);
  df_schedule_free (s);
  df_unet_init (df_model_net (m), 11);
  return m;
}

/* The halves images at another size (nearest neighbour). */
static DfDataset *
halves_dataset_sized (int n, int size)
{
  DfDataset *d = halves_dataset (n);
  float *big = g_new (float, (gsize) n * size * size);

  for (int i = 0; i < n; i++)
    for (int y = 0; y < size; y++)
      for (int x = 0; x < size; x++)
        big[((gsize) i * size + y) * size + x] =
          d->images[((gsize) i * SIZE + y * SIZE / size) * SIZE
                    + x * SIZE / size];
  g_free (d->images);
  d->images = big;
  d->h = d->w = size;
  return d;
}

/* Rename a metadata key of a checkpoint in place (same length: the header
 * keeps its size), as if an older trainer had not written it. */
static void
hide_metadata (const char *path, const char *key)
{
  char *text, *quoted = g_strdup_printf ("\"%s\"", key), *at = NULL;
  gsize len, n = strlen (quoted);

  /* The header follows 8 bytes of length, zeros among them. */
  g_assert_true (g_file_get_contents (path, &text, &len, NULL));
  for (gsize i = 8; i + n <= len && at == NULL; i++)
    if (memcmp (text + i, quoted, n) == 0)
      at = text + i;
  g_assert_nonnull (at);
  at[1] = 'X';
  g_assert_true (g_file_set_contents (path, text, len, NULL));
  g_free (quoted);
  g_free (text);
}

/* Resuming used to check only the tensors' shapes and the task: a
 * checkpoint of another seed, batch, image size (no shape changes with
 * it), schedule, data... was continued as if it were this run.  Each is
 * refused naming the option with both values, and leaves the weights and
 * the step alone; an item an older checkpoint lacks is not checked. */
static void
test_resume_refuses_another_run (void)
{
  static const char *const renamed[] = { "top", "under", NULL };
  static const char *const expect[] = {
    "--seed is 8, the checkpoint ran 7",
    "--batch is 5, the checkpoint ran 4",
    "--hflip is off, the checkpoint ran on",
    "--p-uncond is 0.2, the checkpoint ran 0.3",
    "--data has 32 images, the checkpoint ran 16",
    "--data's class 1 is \"under\", the checkpoint ran \"bottom\"",
    "--size is 16, the checkpoint ran 8",
    "--beta-schedule is squaredcos_cap_v2, the checkpoint ran linear",
    "--timesteps is 500, the checkpoint ran 1000",
    "the schedule's beta_end is 0.03, the checkpoint ran 0.02",
    "--groups is 4, the checkpoint ran 8",
    "--head-dim is 16, the checkpoint ran 8",
  };
  char *dir = g_dir_make_tmp ("df-train-XXXXXX", NULL);
  char *ck = g_build_filename (dir, "ck.safetensors", NULL);
  DfDataset *d = halves_dataset (16);
  DfTrainOptions o;
  DfModel *m;
  DfTrainer *t;
  GError *error = NULL;
  gboolean resumed;
  double loss;

  df_set_threads (1);
  test_options (&o, ck, 10);
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  run_steps (t, 1, &loss);
  g_assert_true (df_trainer_save_checkpoint (t, &error));
  g_assert_no_error (error);
  df_trainer_free (t);
  df_model_free (m);

  o.resume = TRUE;
  for (gsize k = 0; k < G_N_ELEMENTS (expect); k++)
    {
      DfTrainOptions v = o;
      DfDataset *vd = d;
      const DfParam *p;
      float *before;
      int n_params;

      m = NULL;
      switch (k)
        {
        case 0: v.seed = 8; break;
        case 1: v.batch = 5; break;
        case 2: v.hflip = FALSE; break;
        case 3: v.p_uncond = 0.2; break;
        case 4: vd = halves_dataset (32); break;
        case 5:
          m = variant_model (SIZE, 8, 8, DF_BETA_LINEAR, 1000, 0, renamed);
          break;
        case 6:
          vd = halves_dataset_sized (16, 16);
          m = variant_model (16, 8, 8, DF_BETA_LINEAR, 1000, 0, class_names);
          break;
        case 7:
          m = variant_model (SIZE, 8, 8, DF_BETA_COSINE, 1000, 0, class_names);
          break;
        case 8:
          m = variant_model (SIZE, 8, 8, DF_BETA_LINEAR, 500, 0, class_names);
          break;
        case 9:
          m = variant_model (SIZE, 8, 8, DF_BETA_LINEAR, 1000, 0.03,
                             class_names);
          break;
        case 10:
          m = variant_model (SIZE, 4, 8, DF_BETA_LINEAR, 1000, 0, class_names);
          break;
        case 11:
          m = variant_model (SIZE, 8, 16, DF_BETA_LINEAR, 1000, 0,
                             class_names);
          break;
        }
      if (m == NULL)
        m = tiny_model (FALSE, 16, 32, 5);
      p = df_unet_params (df_model_net (m), &n_params);
      before = g_memdup2 (p[0].tensor->data,
                          p[0].tensor->size * sizeof (float));
      t = new_trainer (m, vd, &v);
      resumed = TRUE;
      g_assert_false (df_trainer_resume (t, &resumed, &error));
      g_assert_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_CHECKPOINT);
      g_test_message ("%s", error->message);
      g_assert_nonnull (strstr (error->message, expect[k]));
      g_assert_nonnull (strstr (error->message, ck));
      g_assert_null (strchr (error->message, '\n'));
      g_assert_false (resumed);
      g_assert_cmpint (df_trainer_step_index (t), ==, 0);
      g_assert_true (memcmp (before, p[0].tensor->data,
                             p[0].tensor->size * sizeof (float)) == 0);
      g_clear_error (&error);
      g_free (before);
      df_trainer_free (t);
      df_model_free (m);
      if (vd != d)
        df_dataset_free (vd);
    }

  /* The same run resumes. */
  m = tiny_model (FALSE, 16, 32, 5);
  t = new_trainer (m, d, &o);
  g_assert_true (df_trainer_resume (t, &resumed, &error));
  g_assert_no_error (error);
  g_assert_true (resumed);
  df_trainer_free (t);
  df_model_free (m);

  /* A checkpoint written before train.seed was (older files): the seed is
   * not checked. */
  hide_metadata (ck, "train.seed");
  o.seed = 8;
  m = tiny_model (FALSE, 16, 32, 5);
  t = new_trainer (m, d, &o);
  g_assert_true (df_trainer_resume (t, &resumed, &error));
  g_assert_no_error (error);
  g_assert_true (resumed);
  g_assert_cmpint (df_trainer_step_index (t), ==, 1);
  df_trainer_free (t);
  df_model_free (m);

  df_dataset_free (d);
  rm_rf (dir);
  g_free (ck);
  g_free (dir);
}

/* What a run may change on resume is reported, with both values: the
 * CLI prints one line each. */
static void
test_resume_reports_changes (void)
{
  static const char *const expect[][3] = {
    { "--steps", "10", "12" },
    { "--lr", "0.001", "0.002" },
    { "--lr-schedule", "cosine", "constant" },
    { "--warmup", "2", "3" },
    { "--weight-decay", "0.01", "0.02" },
    { "--ema", "0.99", "0.9" },
    { "--grad-clip", "0.5", "0.25" },
    { "--checkpoint-minutes", "0", "1.5" },
    { "--threads", "1", "2" },
  };
  char *dir = g_dir_make_tmp ("df-train-XXXXXX", NULL);
  char *ck = g_build_filename (dir, "ck.safetensors", NULL);
  DfDataset *d = halves_dataset (16);
  DfTrainOptions o;
  DfModel *m;
  DfTrainer *t;
  GError *error = NULL;
  const DfTrainChange *c;
  gboolean resumed;
  double loss;
  int n;

  df_set_threads (1);
  test_options (&o, ck, 10);
  m = tiny_model (FALSE, 16, 32, 11);
  t = new_trainer (m, d, &o);
  run_steps (t, 1, &loss);
  g_assert_true (df_trainer_save_checkpoint (t, &error));
  g_assert_no_error (error);
  df_trainer_free (t);
  df_model_free (m);

  /* The same options: nothing to report. */
  o.resume = TRUE;
  m = tiny_model (FALSE, 16, 32, 5);
  t = new_trainer (m, d, &o);
  g_assert_true (df_trainer_resume (t, &resumed, &error));
  g_assert_true (resumed);
  df_trainer_changes (t, &n);
  g_assert_cmpint (n, ==, 0);
  df_trainer_free (t);

  o.steps = 12;
  o.lr = 2e-3;
  o.lr_schedule = DF_LR_CONSTANT;
  o.warmup = 3;
  o.weight_decay = 0.02;
  o.ema_decay = 0.9;
  o.grad_clip = 0.25;
  o.checkpoint_minutes = 1.5;
  df_set_threads (2);
  t = new_trainer (m, d, &o);
  g_assert_true (df_trainer_resume (t, &resumed, &error));
  g_assert_no_error (error);
  g_assert_true (resumed);
  c = df_trainer_changes (t, &n);
  for (int i = 0; i < n; i++)
    g_test_message ("%s %s (the checkpoint ran %s)", c[i].option,
                    c[i].value, c[i].checkpoint);
  g_assert_cmpint (n, ==, G_N_ELEMENTS (expect));
  for (int i = 0; i < n; i++)
    {
      g_assert_cmpstr (c[i].option, ==, expect[i][0]);
      g_assert_cmpstr (c[i].checkpoint, ==, expect[i][1]);
      g_assert_cmpstr (c[i].value, ==, expect[i][2]);
    }
  df_set_threads (1);
  df_trainer_free (t);
  df_model_free (m);

  df_dataset_free (d);
  rm_rf (dir);
  g_free (ck);
  g_free (dir);
}

/* ---- options ---- */

/* An infinite weight decay was taken and diverged at step 2. */
static void
test_weight_decay_finite (void)
{
  const double bad[] = { INFINITY, NAN, -0.1, 1000 /* = 1 / lr */ };
  DfDataset *d = halves_dataset (4);
  DfModel *m = tiny_model (FALSE, 16, 32, 11);
  DfTrainOptions o;
  DfTrainer *t;
  GError *error = NULL;

  for (gsize i = 0; i < G_N_ELEMENTS (bad); i++)
    {
      test_options (&o, NULL, 1);
      o.weight_decay = bad[i];
      g_assert_null (df_trainer_new (m, d, &o, &error));
      g_assert_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID);
      g_test_message ("%g: %s", bad[i], error->message);
      g_assert_nonnull (strstr (error->message, "weight decay"));
      g_clear_error (&error);
    }
  test_options (&o, NULL, 1);
  o.weight_decay = 0.5;
  t = new_trainer (m, d, &o);
  df_trainer_free (t);
  df_model_free (m);
  df_dataset_free (d);
}

/* A diverged run said "resume from the last checkpoint" when there was
 * none. */
static void
test_divergence_message (void)
{
  char *dir = g_dir_make_tmp ("df-train-XXXXXX", NULL);
  char *ck = g_build_filename (dir, "ck.safetensors", NULL);
  DfDataset *d = halves_dataset (16);
  DfTrainOptions o;
  GError *error = NULL;
  double loss;

  df_set_threads (1);
  for (int k = 0; k < 3; k++)
    {
      DfModel *m = tiny_model (FALSE, 16, 32, 11);
      DfTrainer *t;
      gboolean ok = TRUE;
      int steps = 0;

      /* Steps of 1e30: the weights overflow on the second pass.  k = 0
       * without a checkpoint file, 1 with one not written yet, 2 with
       * one written after step 1. */
      test_options (&o, k == 0 ? NULL : ck, 10);
      o.lr = 1e30;
      o.warmup = 0;
      o.grad_clip = 0;
      o.weight_decay = 0;
      t = new_trainer (m, d, &o);
      run_steps (t, 1, &loss);
      if (k == 2)
        g_assert_true (df_trainer_save_checkpoint (t, &error));
      g_assert_no_error (error);
      while (ok && steps++ < 5)
        ok = df_trainer_step (t, &loss, &error);
      g_assert_false (ok);
      g_assert_error (error, DF_TRAIN_ERROR, DF_TRAIN_ERROR_INVALID);
      g_test_message ("%s", error->message);
      g_assert_nonnull (strstr (error->message, "diverged"));
      if (k < 2)
        {
          g_assert_null (strstr (error->message, "checkpoint"));
          g_assert_nonnull (strstr (error->message, "start again"));
        }
      else
        {
          g_assert_nonnull (strstr (error->message, ck));
          g_assert_nonnull (strstr (error->message, "(step 1)"));
        }
      g_clear_error (&error);
      df_trainer_free (t);
      df_model_free (m);
    }
  df_dataset_free (d);
  rm_rf (dir);
  g_free (ck);
  g_free (dir);
}

/* ---- memory ---- */

/* The estimate's parameter count is the network's, and its bytes err
 * high: the shipped UNet at batch 64 on two threads peaked at 0.98 GiB
 * resident for the whole program (`/usr/bin/time -v diffuse train`), 0.18
 * GiB of it the 60,000 images. */
static void
test_memory_estimate (void)
{
  DfUNetConfig cfg;
  GError *error = NULL;
  double n_params, bytes, small;

  for (int k = 0; k < 3; k++)
    {
      DfUNet *net;

      tiny_config (&cfg, 16, 32);
      cfg.down_attention[1] = cfg.up_attention[0] = k == 1;
      cfg.layers_per_block = k == 1 ? 2 : 1;
      if (k == 2)
        cfg.classifier_classes = 2;
      else
        cfg.num_class_embeds = 3;
      net = df_unet_new (&cfg, k == 2, &error);
      g_assert_no_error (error);
      bytes = df_train_memory_estimate (&cfg, k == 2, 4, &n_params);
      g_test_message ("tiny %d: %.0f parameters, %.1f MiB at batch 4", k,
                      n_params, bytes / (1 << 20));
      g_assert_cmpfloat (n_params, ==, df_unet_param_count (net));
      g_assert_cmpfloat (bytes, >, 24 * n_params);
      df_unet_free (net);
    }

  /* weights/fashion-mnist-unet.json */
  df_unet_config_init (&cfg);
  cfg.sample_size = 28;
  cfg.in_channels = cfg.out_channels = 1;
  cfg.n_blocks = 3;
  cfg.block_out_channels[0] = 32;
  cfg.block_out_channels[1] = 64;
  cfg.block_out_channels[2] = 128;
  for (int i = 0; i < 3; i++)
    cfg.down_attention[i] = cfg.up_attention[2 - i] = i == 2;
  cfg.layers_per_block = 1;
  cfg.attention_head_dim = 32;
  cfg.num_class_embeds = 11;
  bytes = df_train_memory_estimate (&cfg, FALSE, 64, &n_params);
  small = df_train_memory_estimate (&cfg, FALSE, 8, NULL);
  g_test_message ("shipped UNet: %.0f parameters, %.2f GiB at batch 64, "
                  "%.2f GiB at 8", n_params, bytes / (1 << 30),
                  small / (1 << 30));
  g_assert_cmpfloat (n_params, ==, 2736353);
  g_assert_cmpfloat (bytes, >, 0.98 * (1 << 30));
  g_assert_cmpfloat (bytes, <, 3.0 * (1 << 30));
  g_assert_cmpfloat (small, <, bytes / 4);

  /* The sizes that aborted inside GLib are estimated, not allocated. */
  cfg.block_out_channels[0] = 100000;
  cfg.n_blocks = 2;
  bytes = df_train_memory_estimate (&cfg, FALSE, 64, &n_params);
  g_assert_cmpfloat (n_params, >, 9e10);
  g_assert_cmpfloat (bytes, >, 4 * 9e10);
}

/* ---- slow: learning ---- */

/* Smoothed loss after steps of training, from a fresh trainer. */
static double
train_for (gboolean classifier, int steps, double *first)
{
  DfDataset *d = halves_dataset (256);
  DfTrainOptions o;
  DfModel *m = tiny_model (classifier, 16, 32, 3);
  DfTrainer *t;
  double loss, sum = 0, tail = 0;
  gint64 t0 = g_get_monotonic_time ();

  /* One thread: the machine is shared, and spinning threads on a busy
   * machine cost more than they give. */
  df_set_threads (1);
  df_train_options_init (&o);
  o.steps = steps;
  o.batch = 32;
  o.lr = 2e-3;
  o.warmup = 20;
  o.lr_schedule = DF_LR_COSINE;
  o.seed = 1;
  t = new_trainer (m, d, &o);
  for (int i = 0; i < steps; i++)
    {
      run_steps (t, 1, &loss);
      if (i < 10)
        sum += loss;
      if (i >= steps - 50)
        tail += loss;
    }
  *first = sum / 10;
  g_test_message ("%s: mean loss of steps 1-10 %.4f, of the last 50 %.4f, "
                  "%.1f s", classifier ? "classifier" : "unet", *first,
                  tail / 50, (g_get_monotonic_time () - t0) / 1e6);
  df_trainer_free (t);
  df_model_free (m);
  df_dataset_free (d);
  return tail / 50;
}

static void
test_unet_learns (void)
{
  double first, last = train_for (FALSE, 300, &first);

  g_assert_cmpfloat (first, >, 0.5);
  g_assert_cmpfloat (last, <, UNET_LOSS_BOUND);
}

static void
test_classifier_learns (void)
{
  double first, last = train_for (TRUE, 300, &first);

  g_assert_cmpfloat (last, <, CLASSIFIER_LOSS_BOUND);
}

int
main (int argc, char **argv)
{
  gboolean slow = g_str_has_suffix (argv[0], "-slow");

  g_test_init (&argc, &argv, NULL);

  if (slow)
    {
      g_test_add_func ("/engine/train/slow/unet-loss-drops", test_unet_learns);
      g_test_add_func ("/engine/train/slow/classifier-loss-drops",
                       test_classifier_learns);
      return g_test_run ();
    }
  g_test_add_func ("/engine/train/resume-bit-exact", test_resume_bit_exact);
  g_test_add_func ("/engine/train/seed-changes-the-step", test_seed_matters);
  g_test_add_func ("/engine/train/threads-bit-identical",
                   test_threads_bit_identical);
  g_test_add_func ("/engine/train/checkpoint-failure-keeps-previous",
                   test_checkpoint_failure);
  g_test_add_func ("/engine/train/resume-mismatch-is-an-error",
                   test_resume_mismatch);
  g_test_add_func ("/engine/train/run-log-output-plot",
                   test_run_log_output_plot);
  g_test_add_func ("/engine/train/run-cancel-saves", test_run_cancel);
  g_test_add_func ("/engine/train/data-mismatch", test_data_mismatch);
  g_test_add_func ("/engine/train/resume-refuses-another-run",
                   test_resume_refuses_another_run);
  g_test_add_func ("/engine/train/resume-reports-changes",
                   test_resume_reports_changes);
  g_test_add_func ("/engine/train/weight-decay-finite",
                   test_weight_decay_finite);
  g_test_add_func ("/engine/train/divergence-message", test_divergence_message);
  g_test_add_func ("/engine/train/memory-estimate", test_memory_estimate);
  return g_test_run ();
}
