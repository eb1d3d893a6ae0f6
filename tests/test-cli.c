/* test-cli.c: the `diffuse` program end to end ($DIFFUSE), on tiny models
 * this test writes with the engine: files, sizes, channels, determinism,
 * batch invariance, interpolation ends, info, schedule, eps round trip, and
 * every bad input ending with status 1, one line and no file.
 */
#include <gdk-pixbuf/gdk-pixbuf.h>
#include <glib/gstdio.h>
#include <math.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "blas.h"
#include "model.h"
#include "safetensors.h"
#include "train.h"
#include "unet.h"

static const char *diffuse;
static char *fixtures;      /* temporary folder of model files */
static char *gray_model;    /* 1 x 8 x 8, circle/square/cross + uncond */
static char *rgb_model;     /* 3 x 8 x 8, unconditional */
static char *truncated_model, *misshaped_model, *missing_model;
static char *nouncond_model;    /* 1 x 8 x 8, the 3 classes, no uncond */
static char *gray_classifier;   /* 1 x 8 x 8 noisy classifier, 3 classes */
static char *fruit_classifier;  /* like it: apple/banana/cherry */
static char *pair_classifier;   /* like it: circle/square only */
static char *unnamed_classifier;    /* like it: 3 classes, no names */
static char *folder_model;      /* like gray: blank/dots/stripes + uncond */
static char *folder_classifier; /* blank/dots/stripes, the image folders' */
static char *numeric_model;     /* like gray: classes named 1, 2, 3 */
static gsize gray_params;

/* ---- running diffuse ---- */

typedef struct {
  int   status;             /* exit status, or -1 if it did not exit */
  char *out, *err;
} Run;

static void
run_clear (Run *r)
{
  g_free (r->out);
  g_free (r->err);
}

static Run
run_argv (const char *const *args)
{
  GPtrArray *argv = g_ptr_array_new ();
  GError *error = NULL;
  Run r = { -1, NULL, NULL };
  gint64 start = g_get_monotonic_time ();
  int wait;

  g_ptr_array_add (argv, (char *) diffuse);
  for (int i = 0; args[i]; i++)
    g_ptr_array_add (argv, (char *) args[i]);
  g_ptr_array_add (argv, NULL);
  if (!g_spawn_sync (NULL, (char **) argv->pdata, NULL, G_SPAWN_DEFAULT,
                     NULL, NULL, &r.out, &r.err, &wait, &error))
    g_error ("cannot run %s: %s", diffuse, error->message);
  if (WIFEXITED (wait))
    r.status = WEXITSTATUS (wait);
  g_test_message ("diffuse %s: %.2f s, status %d", args[0] ? args[0] : "",
                  (g_get_monotonic_time () - start) / 1e6, r.status);
  g_ptr_array_free (argv, TRUE);
  return r;
}

#define RUN(...) run_argv ((const char *const[]) { __VA_ARGS__, NULL })

/* One thread: tiny jobs on a shared machine run far faster without OpenMP
 * spinning; the thread-invariance test sets its own. */
#define GENERATE1     "generate", "--threads", "1"
#define INTERPOLATE1  "interpolate", "--threads", "1"
#define TRAIN1        "train", "--threads", "1"
#define EVAL1         "eval", "--threads", "1"

/* Status 0; otherwise show what it said. */
static void
assert_ok (const Run *r)
{
  if (r->status != 0)
    g_test_message ("stderr: %s", r->err);
  g_assert_cmpint (r->status, ==, 0);
}

static char *
new_dir (const char *name)
{
  char *dir = g_build_filename (fixtures, name, NULL);
  char *cmd = g_strdup_printf ("rm -rf '%s'", dir);

  /* A fresh, empty folder each time. */
  g_assert_cmpint (system (cmd), ==, 0);
  g_assert_cmpint (g_mkdir_with_parents (dir, 0755), ==, 0);
  g_free (cmd);
  return dir;
}

static int
count_entries (const char *dir)
{
  GDir *d = g_dir_open (dir, 0, NULL);
  int n = 0;

  if (d == NULL)
    return -1;
  while (g_dir_read_name (d))
    n++;
  g_dir_close (d);
  return n;
}

static GBytes *
read_file (const char *dir, const char *name)
{
  char *path = g_build_filename (dir, name, NULL);
  char *data;
  gsize len;
  GError *error = NULL;

  if (!g_file_get_contents (path, &data, &len, &error))
    g_error ("%s", error->message);
  g_free (path);
  return g_bytes_new_take (data, len);
}

/* IHDR of a PNG: width, height, bit depth, colour type (0 gray, 2 RGB). */
static void
png_header (const char *dir, const char *name, int *w, int *h, int *depth,
            int *ctype)
{
  GBytes *b = read_file (dir, name);
  gsize len;
  const guint8 *d = g_bytes_get_data (b, &len);
  char *path = g_build_filename (dir, name, NULL);
  GdkPixbuf *pb;
  GError *error = NULL;

  g_assert_cmpuint (len, >, 33);
  g_assert_cmpmem (d, 8, "\x89PNG\r\n\x1a\n", 8);
  g_assert_cmpmem (d + 12, 4, "IHDR", 4);
  *w = d[16] << 24 | d[17] << 16 | d[18] << 8 | d[19];
  *h = d[20] << 24 | d[21] << 16 | d[22] << 8 | d[23];
  *depth = d[24];
  *ctype = d[25];

  /* And a decoder agrees it is a whole PNG of that size. */
  pb = gdk_pixbuf_new_from_file (path, &error);
  g_assert_no_error (error);
  g_assert_cmpint (gdk_pixbuf_get_width (pb), ==, *w);
  g_assert_cmpint (gdk_pixbuf_get_height (pb), ==, *h);
  g_object_unref (pb);
  g_free (path);
  g_bytes_unref (b);
}

static void
assert_same_file (const char *dir_a, const char *dir_b, const char *name)
{
  GBytes *a = read_file (dir_a, name), *b = read_file (dir_b, name);

  if (!g_bytes_equal (a, b))
    g_test_message ("%s differs between %s and %s", name, dir_a, dir_b);
  g_assert_true (g_bytes_equal (a, b));
  g_bytes_unref (a);
  g_bytes_unref (b);
}

static gboolean
same_file_bytes (const char *dir_a, const char *dir_b, const char *name)
{
  GBytes *a = read_file (dir_a, name), *b = read_file (dir_b, name);
  gboolean same = g_bytes_equal (a, b);

  g_bytes_unref (a);
  g_bytes_unref (b);
  return same;
}

/* ---- fixtures ---- */

/* uncond: add the unconditional class (conditional models); classifier: a
 * noisy classifier of the 3 classes instead of a UNet. */
static char *
write_model_full (const char *name, int channels, gboolean conditional,
                  gboolean uncond, gboolean classifier)
{
  const char *names[] = { "circle", "square", "cross", NULL };
  char *path = g_build_filename (fixtures, name, NULL);
  DfUNetConfig cfg;
  DfSchedule *s;
  DfModel *m;
  GError *error = NULL;

  df_unet_config_init (&cfg);
  cfg.sample_size = 8;
  cfg.in_channels = cfg.out_channels = channels;
  cfg.n_blocks = 2;
  cfg.block_out_channels[0] = 4;
  cfg.block_out_channels[1] = 4;
  cfg.down_attention[0] = FALSE;
  cfg.down_attention[1] = TRUE;
  cfg.up_attention[0] = TRUE;
  cfg.up_attention[1] = FALSE;
  cfg.layers_per_block = 1;
  cfg.norm_num_groups = 2;
  cfg.attention_head_dim = 4;
  cfg.num_class_embeds = classifier ? 0 : !conditional ? 0 : uncond ? 4 : 3;
  cfg.classifier_classes = classifier ? 3 : 0;

  s = df_schedule_new (DF_BETA_LINEAR, 1000, 0, 0, &error);
  g_assert_no_error (error);
  m = df_model_new (&cfg, classifier, s,
                    conditional || classifier ? names : NULL,
                    conditional && uncond ? 3 : -1, &error);
  g_assert_no_error (error);
  df_unet_init (df_model_net (m), 1);
  if (conditional && uncond && !classifier)
    gray_params = df_unet_param_count (df_model_net (m));
  df_model_save (m, path, &error);
  g_assert_no_error (error);
  df_model_free (m);
  df_schedule_free (s);
  return path;
}

static char *
write_model (const char *name, int channels, gboolean conditional)
{
  return write_model_full (name, channels, conditional, TRUE, FALSE);
}

/* The network of like (a fixture above) with k other classes: names, or
 * none (then the file has the indices); a UNet keeps its unconditional
 * class, after the k. */
static char *
write_model_classes (const char *name, const char *like, int k,
                     const char *const *names)
{
  char *path = g_build_filename (fixtures, name, NULL);
  GError *error = NULL;
  DfModel *base = df_model_load (like, &error), *m;
  DfUNetConfig cfg;
  gboolean classifier, uncond;

  g_assert_no_error (error);
  cfg = *df_unet_config (df_model_net (base));
  classifier = df_model_is_classifier (base);
  uncond = df_model_uncond_class (base) >= 0;
  if (classifier)
    cfg.classifier_classes = k;
  else
    cfg.num_class_embeds = uncond ? k + 1 : k;
  m = df_model_new (&cfg, classifier, df_model_schedule (base), names,
                    uncond ? k : -1, &error);
  g_assert_no_error (error);
  df_unet_init (df_model_net (m), 1);
  df_model_save (m, path, &error);
  g_assert_no_error (error);
  df_model_free (m);
  df_model_free (base);
  return path;
}

/* The good file with conv_in.weight's shape changed (same byte count), so
 * only the shape check can catch it. */
static char *
write_misshaped (const char *good)
{
  const char *keys[] = { "format", "format_version", "kind", "config",
                         "schedule", "class_names", "uncond_class" };
  char *path = g_build_filename (fixtures, "misshaped.safetensors", NULL);
  GPtrArray *meta = g_ptr_array_new ();
  GError *error = NULL;
  DfSafetensors *st = df_safetensors_open (good, &error);
  char **names;
  int n;
  DfSafetensorsEntry *e;

  g_assert_no_error (error);
  for (gsize i = 0; i < G_N_ELEMENTS (keys); i++)
    if (df_safetensors_get_metadata (st, keys[i]))
      {
        g_ptr_array_add (meta, (char *) keys[i]);
        g_ptr_array_add (meta,
                         (char *) df_safetensors_get_metadata (st, keys[i]));
      }
  g_ptr_array_add (meta, NULL);

  names = df_safetensors_names (st);
  n = g_strv_length (names);
  e = g_new0 (DfSafetensorsEntry, n);
  for (int i = 0; i < n; i++)
    {
      gsize size = 1;
      float *data;

      e[i].name = names[i];
      g_assert_true (df_safetensors_shape (st, names[i], &e[i].ndim,
                                           e[i].shape));
      for (int k = 0; k < e[i].ndim; k++)
        size *= e[i].shape[k];
      data = g_new (float, size);
      df_safetensors_read_f32 (st, names[i], e[i].ndim, e[i].shape, data,
                               &error);
      g_assert_no_error (error);
      e[i].data = data;
      if (strcmp (names[i], "conv_in.weight") == 0)
        {
          /* [8, C, 3, 3] -> [8, C, 9, 1] */
          g_assert_cmpint (e[i].ndim, ==, 4);
          e[i].shape[2] = 9;
          e[i].shape[3] = 1;
        }
    }
  df_safetensors_write (path, (const char *const *) meta->pdata, e, n, &error);
  g_assert_no_error (error);
  for (int i = 0; i < n; i++)
    g_free ((float *) e[i].data);
  g_free (e);
  g_strfreev (names);
  g_ptr_array_free (meta, TRUE);
  df_safetensors_free (st);
  return path;
}

static char *
write_truncated (const char *good)
{
  char *path = g_build_filename (fixtures, "truncated.safetensors", NULL);
  char *data;
  gsize len;
  GError *error = NULL;

  g_file_get_contents (good, &data, &len, &error);
  g_assert_no_error (error);
  g_file_set_contents (path, data, len * 3 / 5, &error);
  g_assert_no_error (error);
  g_free (data);
  return path;
}

/* ---- usage ---- */

static void
test_usage (void)
{
  const char *cmds[] = { "generate", "interpolate", "info", "schedule", "eps",
                         "train", "eval" };
  Run r = RUN ("--help");

  assert_ok (&r);
  for (gsize i = 0; i < G_N_ELEMENTS (cmds); i++)
    g_assert_nonnull (strstr (r.out, cmds[i]));
  run_clear (&r);

  for (gsize i = 0; i < G_N_ELEMENTS (cmds); i++)
    {
      r = RUN (cmds[i], "--help");
      assert_ok (&r);
      g_assert_nonnull (strstr (r.out, "--"));
      run_clear (&r);
    }
}

/* No command is a mistake: the list goes to stderr with status 1 (it used
 * to be status 0, as if something had run). */
static void
test_no_command (void)
{
  Run r = run_argv ((const char *const[]) { NULL });

  g_test_message ("stderr: %s", r.err);
  g_assert_cmpint (r.status, ==, 1);
  g_assert_cmpstr (r.out, ==, "");
  g_assert_true (g_str_has_prefix (r.err, "Usage: diffuse COMMAND"));
  g_assert_nonnull (strstr (r.err, "interpolate"));
  run_clear (&r);
}

/* ---- generate ---- */

static void
test_generate_files (void)
{
  char *dir = new_dir ("gen-files");
  Run r = RUN (GENERATE1, "--model", gray_model, "--steps", "10", "--count",
               "5", "--seed", "3", "--out", dir, "--quiet");
  int w, h, depth, ctype;

  assert_ok (&r);
  g_assert_cmpint (count_entries (dir), ==, 6);
  for (int i = 0; i < 5; i++)
    {
      char name[16];
      g_snprintf (name, sizeof name, "%04d.png", i);
      png_header (dir, name, &w, &h, &depth, &ctype);
      g_assert_cmpint (w, ==, 8);
      g_assert_cmpint (h, ==, 8);
      g_assert_cmpint (depth, ==, 8);
      g_assert_cmpint (ctype, ==, 0);
    }

  /* 5 tiles: 3 columns, 2 rows, 2 px gaps. */
  png_header (dir, "grid.png", &w, &h, &depth, &ctype);
  g_assert_cmpint (w, ==, 3 * 8 + 2 * 2);
  g_assert_cmpint (h, ==, 2 * 8 + 2);
  g_assert_cmpint (ctype, ==, 0);
  run_clear (&r);
  g_free (dir);
}

static void
test_generate_rgb (void)
{
  char *dir = new_dir ("gen-rgb");
  Run r = RUN (GENERATE1, "--model", rgb_model, "--steps", "5", "--count",
               "4", "--out", dir, "--quiet");
  int w, h, depth, ctype;

  assert_ok (&r);
  g_assert_cmpint (count_entries (dir), ==, 5);
  png_header (dir, "0003.png", &w, &h, &depth, &ctype);
  g_assert_cmpint (w, ==, 8);
  g_assert_cmpint (h, ==, 8);
  g_assert_cmpint (depth, ==, 8);
  g_assert_cmpint (ctype, ==, 2);
  png_header (dir, "grid.png", &w, &h, &depth, &ctype);
  g_assert_cmpint (w, ==, 2 * 8 + 2);
  g_assert_cmpint (h, ==, 2 * 8 + 2);
  g_assert_cmpint (ctype, ==, 2);
  run_clear (&r);
  g_free (dir);
}

static void
test_generate_same_seed (void)
{
  char *a = new_dir ("seed-a"), *b = new_dir ("seed-b");
  char *c = new_dir ("seed-c");
  Run r;
  GBytes *x, *y;

  r = RUN (GENERATE1, "--model", gray_model, "--steps", "8", "--count", "3",
           "--seed", "11", "--eta", "0.5", "--out", a, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  r = RUN (GENERATE1, "--model", gray_model, "--steps", "8", "--count", "3",
           "--seed", "11", "--eta", "0.5", "--out", b, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  for (int i = 0; i < 3; i++)
    {
      char name[16];
      g_snprintf (name, sizeof name, "%04d.png", i);
      assert_same_file (a, b, name);
    }
  assert_same_file (a, b, "grid.png");

  /* Another seed, another image: the test above can fail. */
  r = RUN (GENERATE1, "--model", gray_model, "--steps", "8", "--count", "3",
           "--seed", "12", "--eta", "0.5", "--out", c, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  x = read_file (a, "0000.png");
  y = read_file (c, "0000.png");
  g_assert_false (g_bytes_equal (x, y));
  g_bytes_unref (x);
  g_bytes_unref (y);
  g_free (a);
  g_free (b);
  g_free (c);
}

static void
test_generate_batch_invariant (void)
{
  char *a = new_dir ("batch-1"), *b = new_dir ("batch-4");
  Run r;

  /* DDPM draws noise every step: the strictest case. */
  r = RUN ("generate", "--model", gray_model, "--steps", "8", "--count", "5",
           "--sampler", "ddpm", "--batch", "1", "--threads", "1", "--out", a,
           "--quiet");
  assert_ok (&r);
  run_clear (&r);
  r = RUN ("generate", "--model", gray_model, "--steps", "8", "--count", "5",
           "--sampler", "ddpm", "--batch", "4", "--threads", "2", "--out", b,
           "--quiet");
  assert_ok (&r);
  run_clear (&r);
  for (int i = 0; i < 5; i++)
    {
      char name[16];
      g_snprintf (name, sizeof name, "%04d.png", i);
      assert_same_file (a, b, name);
    }
  g_free (a);
  g_free (b);
}

static void
test_generate_class_name (void)
{
  char *a = new_dir ("class-name"), *b = new_dir ("class-index");
  Run r;

  r = RUN (GENERATE1, "--model", gray_model, "--steps", "6", "--count", "2",
           "--class", "square", "--out", a, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  r = RUN (GENERATE1, "--model", gray_model, "--steps", "6", "--count", "2",
           "--class", "1", "--guidance", "free", "--guidance-scale", "3",
           "--out", b, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  assert_same_file (a, b, "0000.png");
  assert_same_file (a, b, "0001.png");
  g_free (a);
  g_free (b);
}

/* Free guidance by default guides only the default interval's noise
 * levels: the same images as that interval given, others than every step
 * guided (5 leading steps: sigma 0.01, 0.72, 2.0, 6.2, 26). */
static void
test_generate_guidance_interval (void)
{
  char *a = new_dir ("interval-default"), *b = new_dir ("interval-given");
  char *c = new_dir ("interval-every");
  Run r;

  r = RUN (GENERATE1, "--model", gray_model, "--steps", "5", "--count", "1",
           "--class", "1", "--out", a, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  r = RUN (GENERATE1, "--model", gray_model, "--steps", "5", "--count", "1",
           "--class", "1", "--guidance-interval", DF_FREE_GUIDE_TEXT,
           "--out", b, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  r = RUN (GENERATE1, "--model", gray_model, "--steps", "5", "--count", "1",
           "--class", "1", "--guidance-interval", "0,inf", "--out", c,
           "--quiet");
  assert_ok (&r);
  run_clear (&r);
  assert_same_file (a, b, "0000.png");
  g_assert_false (same_file_bytes (a, c, "0000.png"));

  /* Scale 0 is unconditional sampling at every step: no default interval
   * (outside one it would be conditional). */
  r = RUN (GENERATE1, "--model", gray_model, "--steps", "5", "--count", "1",
           "--class", "1", "--guidance-scale", "0", "--out", a, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  r = RUN (GENERATE1, "--model", gray_model, "--steps", "5", "--count", "1",
           "--class", "1", "--guidance-scale", "0", "--guidance-interval",
           "0,inf", "--out", b, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  assert_same_file (a, b, "0000.png");

  /* Scale 1 is conditional sampling, however few the steps. */
  r = RUN (GENERATE1, "--model", gray_model, "--steps", "2", "--count", "1",
           "--class", "1", "--guidance-scale", "1", "--out", a, "--quiet");
  assert_ok (&r);
  g_assert_cmpstr (r.err, ==, "");
  run_clear (&r);

  /* The default scale at 2 steps, which the default interval leaves
   * unguided: conditional samples (scale 1's), and a note that says so. */
  r = RUN (GENERATE1, "--model", gray_model, "--steps", "2", "--count", "1",
           "--class", "1", "--out", b, "--quiet");
  assert_ok (&r);
  g_assert_nonnull (strstr (r.err, "note: none of the 2 steps has a noise "
                                   "level in the default guidance interval"));
  run_clear (&r);
  assert_same_file (a, b, "0000.png");
  g_free (a);
  g_free (b);
  g_free (c);
}

static void
test_generate_progress (void)
{
  char *dir = new_dir ("progress");
  Run r = RUN (GENERATE1, "--model", gray_model, "--steps", "4", "--count",
               "1", "--out", dir);

  /* Not a tty: plain lines, the last one the final step. */
  assert_ok (&r);
  g_assert_nonnull (strstr (r.err, "4/4"));
  g_assert_nonnull (strstr (r.err, "it/s"));
  g_assert_null (strchr (r.err, '\r'));
  run_clear (&r);
  g_free (dir);
}

/* ---- interpolate ---- */

static void
test_interpolate_ends (void)
{
  char *in = new_dir ("interp"), *ga = new_dir ("interp-a");
  char *gb = new_dir ("interp-b");
  GBytes *x, *y;
  Run r;
  int w, h, depth, ctype;

  r = RUN (INTERPOLATE1, "--model", gray_model, "--seeds", "7,9",
           "--frames", "4", "--steps", "10", "--class", "cross", "--out", in,
           "--quiet");
  assert_ok (&r);
  run_clear (&r);
  g_assert_cmpint (count_entries (in), ==, 5);
  png_header (in, "strip.png", &w, &h, &depth, &ctype);
  g_assert_cmpint (w, ==, 4 * 8 + 3 * 2);
  g_assert_cmpint (h, ==, 8);

  r = RUN (GENERATE1, "--model", gray_model, "--seed", "7", "--count", "1",
           "--steps", "10", "--class", "cross", "--out", ga, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  r = RUN (GENERATE1, "--model", gray_model, "--seed", "9", "--count", "1",
           "--steps", "10", "--class", "cross", "--out", gb, "--quiet");
  assert_ok (&r);
  run_clear (&r);

  /* Frame 0 is seed A; the last frame is seed B. */
  assert_same_file (in, ga, "0000.png");
  x = read_file (in, "0003.png");
  y = read_file (gb, "0000.png");
  g_assert_true (g_bytes_equal (x, y));
  g_bytes_unref (x);
  g_bytes_unref (y);
  g_free (in);
  g_free (ga);
  g_free (gb);
}

/* ---- info and schedule ---- */

static void
test_info (void)
{
  Run r = RUN ("info", "--model", gray_model);
  char *count = g_strdup_printf ("parameters: %" G_GSIZE_FORMAT "\n",
                                 gray_params);
  char *kernel;
  GError *error = NULL;

  assert_ok (&r);
  g_test_message ("%s", r.out);
  g_assert_nonnull (strstr (r.out, count));
  df_blas_init (&error);
  g_assert_no_error (error);
  kernel = g_strdup_printf ("blas kernel: %s (%s", df_blas_corename (),
                            df_blas_choice ());
  g_assert_nonnull (strstr (r.out, kernel));
  g_assert_nonnull (strstr (r.out, df_blas_cpu_coretype ()));
  g_assert_nonnull (strstr (r.out, "square"));
  g_assert_nonnull (strstr (r.out, "uncond class: 3"));
  g_assert_nonnull (strstr (r.out, "\"block_out_channels\""));
  run_clear (&r);
  g_free (count);
  g_free (kernel);
}

static void
test_schedule (void)
{
  const char *spacings[] = { "leading", "trailing", "linspace" };

  for (gsize k = 0; k < G_N_ELEMENTS (spacings); k++)
    {
      Run r = RUN ("schedule", "--model", gray_model, "--steps", "37",
                   "--spacing", spacings[k]);
      char **lines;
      int rows = 0, prev = 1000;
      double prev_ab = 0;

      assert_ok (&r);
      lines = g_strsplit (r.out, "\n", -1);
      for (int i = 0; lines[i]; i++)
        {
          int index, t;
          double ab, sigma;

          if (lines[i][0] == '#' || lines[i][0] == 0)
            continue;
          g_assert_cmpint (sscanf (lines[i], "%d %d %lf %lf", &index, &t, &ab,
                                   &sigma), ==, 4);
          g_assert_cmpfloat (fabs (sigma - sqrt ((1 - ab) / ab)), <=,
                             1e-5 * sigma);
          g_assert_cmpint (index, ==, rows);
          /* Descending, hence distinct, inside [0, T-1]. */
          g_assert_cmpint (t, <, prev);
          g_assert_cmpint (t, >=, 0);
          g_assert_cmpfloat (ab, >, prev_ab);
          g_assert_cmpfloat (ab, <, 1);
          prev = t;
          prev_ab = ab;
          rows++;
        }
      g_assert_cmpint (rows, ==, 37);
      g_strfreev (lines);
      run_clear (&r);
    }
}

/* ---- eps ---- */

static void
write_npy (const char *path, const char *header_dict, const float *x,
           gsize n, int major)
{
  GString *h = g_string_new (header_dict);
  GByteArray *b = g_byte_array_new ();
  guint8 pre[10] = { 0x93, 'N', 'U', 'M', 'P', 'Y', major, 0, 0, 0 };
  GError *error = NULL;

  while ((10 + h->len + 1) % 64)
    g_string_append_c (h, ' ');
  g_string_append_c (h, '\n');
  pre[8] = h->len & 0xff;
  pre[9] = h->len >> 8;
  g_byte_array_append (b, pre, 10);
  g_byte_array_append (b, (guint8 *) h->str, h->len);
  g_byte_array_append (b, (const guint8 *) x, n * sizeof (float));
  g_file_set_contents (path, (char *) b->data, b->len, &error);
  g_assert_no_error (error);
  g_byte_array_free (b, TRUE);
  g_string_free (h, TRUE);
}

static void
test_eps_round_trip (void)
{
  char *dir = new_dir ("eps");
  char *in = g_build_filename (dir, "x.npy", NULL);
  char *out = g_build_filename (dir, "eps.npy", NULL);
  float x[2 * 64], want[2 * 64];
  int labels[2] = { 2, 2 };
  const float *got;
  GError *error = NULL;
  DfModel *m;
  GBytes *b;
  gsize len, hlen;
  const guint8 *d;
  double worst = 0;
  Run r;

  for (int i = 0; i < 2 * 64; i++)
    x[i] = sinf (i * 0.37f) * 1.5f;
  write_npy (in, "{'descr': '<f4', 'fortran_order': False, "
             "'shape': (2, 1, 8, 8), }", x, 2 * 64, 1);
  r = RUN ("eps", "--model", gray_model, "--input", in, "--t", "500",
           "--class", "cross", "--output", out);
  assert_ok (&r);
  run_clear (&r);

  /* Parse the output independently of the program. */
  b = read_file (dir, "eps.npy");
  d = g_bytes_get_data (b, &len);
  g_assert_cmpmem (d, 8, "\x93NUMPY\x01\x00", 8);
  hlen = d[8] | d[9] << 8;
  g_assert_cmpint ((10 + hlen) % 16, ==, 0);
  g_assert_nonnull (g_strstr_len ((const char *) d + 10, hlen, "'<f4'"));
  g_assert_nonnull (g_strstr_len ((const char *) d + 10, hlen,
                                  "(2, 1, 8, 8)"));
  g_assert_cmpuint (len, ==, 10 + hlen + sizeof want);
  got = (const float *) (d + 10 + hlen);

  m = df_model_load (gray_model, &error);
  g_assert_no_error (error);
  df_model_eps (m, x, 2, 500, labels, want, &error);
  g_assert_no_error (error);
  for (int i = 0; i < 2 * 64; i++)
    worst = MAX (worst, fabs (got[i] - want[i]));
  g_test_message ("worst |eps_cli - eps_engine| = %g", worst);
  /* The engine is batch- and thread-invariant, so bit-identical. */
  g_assert_cmpfloat (worst, ==, 0);
  df_model_free (m);
  g_bytes_unref (b);
  g_free (in);
  g_free (out);
  g_free (dir);
}

typedef struct {
  const char *name;
  const char *dict;
  gsize       floats;
  int         major;
  const char *expect;      /* in the message */
} BadNpy;

static const BadNpy bad_npys[] = {
  { "dtype", "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1, 8, 8), }",
    128, 1, "<f8" },
  { "three-d", "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 8, 8), }",
    64, 1, "4-D" },
  { "truncated", "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 8, 8), }",
    40, 1, "truncated" },
  { "fortran", "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 1, 8, 8), }",
    64, 1, "Fortran" },
  { "version", "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 8, 8), }",
    64, 2, "version" },
  { "garbage", "{'descr': '<f4', 'shape': [1, 1, 8, 8]}", 64, 1, "header" },
  { "channels", "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 8, 8), }",
    192, 1, "does not fit" },
};

static void
assert_one_line_error (const Run *r, const char *expect)
{
  const char *nl;

  g_test_message ("stderr: %s", r->err);
  g_assert_cmpint (r->status, ==, 1);
  g_assert_true (g_str_has_prefix (r->err, "diffuse: "));
  nl = strchr (r->err, '\n');
  g_assert_nonnull (nl);
  g_assert_cmpstr (nl + 1, ==, "");
  if (expect)
    g_assert_nonnull (strstr (r->err, expect));
}

static void
test_eps_bad (gconstpointer data)
{
  const BadNpy *c = data;
  char *dir = new_dir ("eps-bad");
  char *in = g_build_filename (dir, "x.npy", NULL);
  char *out = g_build_filename (dir, "eps.npy", NULL);
  float x[192] = { 0 };
  Run r;

  write_npy (in, c->dict, x, c->floats, c->major);
  r = RUN ("eps", "--model", gray_model, "--input", in, "--t", "10",
           "--output", out);
  assert_one_line_error (&r, c->expect);
  g_assert_false (g_file_test (out, G_FILE_TEST_EXISTS));
  g_assert_cmpint (count_entries (dir), ==, 1);
  run_clear (&r);
  g_free (in);
  g_free (out);
  g_free (dir);
}

static void
test_eps_bad_magic (void)
{
  char *dir = new_dir ("eps-magic");
  char *in = g_build_filename (dir, "x.npy", NULL);
  char *out = g_build_filename (dir, "eps.npy", NULL);
  Run r;

  g_file_set_contents (in, "not an array at all", -1, NULL);
  r = RUN ("eps", "--model", gray_model, "--input", in, "--t", "10",
           "--output", out);
  assert_one_line_error (&r, "not a .npy file");
  g_assert_false (g_file_test (out, G_FILE_TEST_EXISTS));
  run_clear (&r);
  g_free (in);
  g_free (out);
  g_free (dir);
}

/* ---- bad input: status 1, one line, nothing written ---- */

typedef struct {
  const char *name;
  const char *args[12];     /* after "--out DIR"; "@gray" etc. replaced */
  const char *expect;
} BadCase;

static const BadCase bad_cases[] = {
  { "steps-zero", { "generate", "--model", "@gray", "--steps", "0" }, "--steps" },
  { "steps-above-T", { "generate", "--model", "@gray", "--steps", "1001" },
    "1000" },
  { "eta-negative", { "generate", "--model", "@gray", "--eta", "-1" }, "--eta" },
  { "eta-nan", { "generate", "--model", "@gray", "--eta", "nan" }, "--eta" },
  { "guidance-scale-negative", { "generate", "--model", "@gray", "--class",
                                 "1", "--guidance-scale", "-1" },
    "--guidance-scale -1 is out of range: use 0..100" },
  { "guidance-scale-above-100", { "interpolate", "--model", "@gray",
                                  "--class", "1", "--guidance-scale", "101" },
    "--guidance-scale 101 is out of range: use 0..100" },
  { "threads-too-many", { "generate", "--model", "@gray", "--threads", "100000" },
    "--threads" },
  { "count-zero", { "generate", "--model", "@gray", "--count", "0" }, "--count" },
  { "class-out-of-range", { "generate", "--model", "@gray", "--class", "3" },
    "out of range" },
  { "class-unknown", { "generate", "--model", "@gray", "--class", "hexagon" },
    "hexagon" },
  { "class-unconditional", { "generate", "--model", "@rgb", "--class", "0" },
    "unconditional" },
  { "model-missing", { "generate", "--model", "@missing" }, "@missing" },
  { "model-truncated", { "generate", "--model", "@truncated" }, "@truncated" },
  { "model-misshaped", { "generate", "--model", "@misshaped" }, "conv_in" },
  { "unknown-option", { "generate", "--model", "@gray", "--bogus" }, "--bogus" },
  { "sampler-unknown", { "generate", "--model", "@gray", "--sampler", "euler" },
    "euler" },
  { "seed-negative", { "generate", "--model", "@gray", "--seed", "-4" }, "--seed" },
  { "guidance-without-class", { "generate", "--model", "@gray", "--guidance",
                                "free" }, "--class" },
  { "interpolate-steps-zero", { "interpolate", "--model", "@gray", "--seeds",
                                "1,2", "--steps", "0" }, "--steps" },
  { "interpolate-no-seeds", { "interpolate", "--model", "@gray" }, "--seeds" },
  { "interpolate-bad-seeds", { "interpolate", "--model", "@gray", "--seeds",
                               "1" }, "--seeds" },
  { "interpolate-class", { "interpolate", "--model", "@gray", "--seeds", "1,2",
                           "--class", "9" }, "out of range" },
  { "interpolate-misshaped", { "interpolate", "--model", "@misshaped",
                               "--seeds", "1,2" }, "conv_in" },

  /* eta in the plug-in's range (the sampler clamped what lies above 1). */
  { "eta-above-one", { "generate", "--model", "@gray", "--eta", "1.5" },
    "--eta 1.5 is out of range: use 0..1" },

  /* Options given where they would have no effect. */
  { "eta-with-ddpm", { "generate", "--model", "@gray", "--sampler", "ddpm",
                       "--eta", "0.5" },
    "--eta 0.5 has no effect with --sampler ddpm" },
  { "eta-zero-with-ddpm", { "generate", "--model", "@gray", "--sampler",
                            "ddpm", "--eta", "0" },
    "--eta 0 has no effect with --sampler ddpm" },
  { "variance-with-ddim", { "generate", "--model", "@gray", "--variance",
                            "fixed_large" },
    "--variance fixed_large has no effect with --sampler ddim" },
  { "variance-with-explicit-ddim", { "generate", "--model", "@gray",
                                     "--sampler", "ddim", "--variance",
                                     "fixed_small" },
    "--variance fixed_small has no effect with --sampler ddim" },
  { "guidance-scale-without-class", { "generate", "--model", "@gray",
                                      "--guidance-scale", "2" },
    "--guidance-scale 2 has no effect without --class" },
  { "guidance-scale-with-guidance-none", { "generate", "--model", "@gray",
                                           "--class", "1", "--guidance",
                                           "none", "--guidance-scale", "2" },
    "--guidance-scale 2 has no effect with --guidance none" },
  { "guidance-scale-no-uncond-class", { "generate", "--model", "@nouncond",
                                        "--class", "1", "--guidance-scale",
                                        "2" },
    "has no unconditional class, so --class 1 samples without guidance" },
  { "classifier-without-classifier-guidance",
    { "generate", "--model", "@gray", "--class", "1", "--classifier",
      "@gray" }, "has no effect without --guidance classifier" },
  { "interpolate-guidance-scale-without-class",
    { "interpolate", "--model", "@gray", "--seeds", "1,2",
      "--guidance-scale", "2" },
    "--guidance-scale 2 has no effect without --class" },
  { "guidance-interval-without-class",
    { "generate", "--model", "@gray", "--guidance-interval", "0.5,5" },
    "--guidance-interval 0.5,5 has no effect without --class" },
  { "guidance-interval-with-guidance-none",
    { "generate", "--model", "@gray", "--class", "1", "--guidance", "none",
      "--guidance-interval", "0.5,5" },
    "--guidance-interval 0.5,5 has no effect with --guidance none" },
  { "guidance-interval-no-uncond-class",
    { "generate", "--model", "@nouncond", "--class", "1",
      "--guidance-interval", "0.5,5" },
    "--guidance-interval 0.5,5 has no effect: " },
  { "guidance-interval-reversed",
    { "generate", "--model", "@gray", "--class", "1",
      "--guidance-interval", "5,0.5" },
    "--guidance-interval '5,0.5': give LOW,HIGH" },
  { "guidance-interval-one-number",
    { "interpolate", "--model", "@gray", "--seeds", "1,2", "--class", "1",
      "--guidance-interval", "5" },
    "--guidance-interval '5': give LOW,HIGH" },
  { "guidance-interval-not-a-number",
    { "generate", "--model", "@gray", "--class", "1",
      "--guidance-interval", "0.5,lots" },
    "--guidance-interval '0.5,lots': give LOW,HIGH" },
  { "guidance-interval-guides-nothing",
    { "generate", "--model", "@gray", "--class", "1", "--steps", "5",
      "--guidance-interval", "200,inf" },
    "--guidance-interval 200,inf holds none of the 5 steps' noise levels" },
  { "guidance-scale-default-interval-guides-nothing",
    { "generate", "--model", "@gray", "--class", "1", "--steps", "2",
      "--guidance-scale", "2" },
    "--guidance-scale 2 has no effect: none of the 2 steps has a noise "
    "level in the default guidance interval (0.28,3]" },
  { "guidance-interval-at-scale-one",
    { "generate", "--model", "@gray", "--class", "1", "--guidance-scale",
      "1", "--guidance-interval", "0.5,5" },
    "--guidance-interval 0.5,5 has no effect at guidance scale 1" },
  { "interpolate-guidance-scale-no-uncond-class",
    { "interpolate", "--model", "@nouncond", "--seeds", "1,2", "--class", "1",
      "--guidance-scale", "2" },
    "samples without guidance; drop --guidance-scale" },
  { "guidance-interval-negative",
    { "generate", "--model", "@gray", "--class", "1",
      "--guidance-interval", "-1,2" },
    "--guidance-interval '-1,2': give LOW,HIGH" },
};

static const char *
substitute (const char *arg)
{
  if (arg == NULL || arg[0] != '@')
    return arg;
  if (strcmp (arg, "@gray") == 0)
    return gray_model;
  if (strcmp (arg, "@rgb") == 0)
    return rgb_model;
  if (strcmp (arg, "@missing") == 0)
    return missing_model;
  if (strcmp (arg, "@truncated") == 0)
    return truncated_model;
  if (strcmp (arg, "@misshaped") == 0)
    return misshaped_model;
  if (strcmp (arg, "@nouncond") == 0)
    return nouncond_model;
  g_assert_not_reached ();
}

static void
test_bad_input (gconstpointer data)
{
  const BadCase *c = data;
  char *dir = new_dir ("bad");
  char *out = g_build_filename (dir, "out", NULL);
  const char *args[20];
  const char *expect = substitute (c->expect);
  int n = 0;
  Run r;

  for (int i = 0; c->args[i]; i++)
    args[n++] = substitute (c->args[i]);
  args[n++] = "--out";
  args[n++] = out;
  args[n++] = "--quiet";
  args[n] = NULL;
  r = run_argv (args);
  assert_one_line_error (&r, expect);

  /* No file: not even the output folder. */
  g_assert_cmpint (count_entries (dir), ==, 0);
  run_clear (&r);
  g_free (out);
  g_free (dir);
}

/* --out "" once wrote into the current folder and named "/0000.png". */
static void
test_out_empty (void)
{
  const char *args[] = { "generate", "--model", substitute ("@gray"),
                         "--count", "1", "--steps", "1", "--out", "",
                         "--quiet", NULL };
  Run r = run_argv (args);

  assert_one_line_error (&r, "--out");
  run_clear (&r);
}

static void
test_schedule_bad (void)
{
  Run r = RUN ("schedule", "--steps", "0");

  assert_one_line_error (&r, "--steps");
  run_clear (&r);
  r = RUN ("schedule", "--timesteps", "100", "--steps", "101");
  assert_one_line_error (&r, "101");
  run_clear (&r);
  r = RUN ("schedule", "--spacing", "sideways");
  assert_one_line_error (&r, "sideways");
  run_clear (&r);
  r = RUN ("frobnicate");
  assert_one_line_error (&r, "frobnicate");
  run_clear (&r);
}

/* ---- train and eval, on a tiny folder of class folders ---- */

/* 3 class folders of per_class 8 x 8 RGB images; shift changes the
 * pictures, so a test set differs from the training set. */
static char *
write_image_folder_named (const char *name, int per_class, int shift)
{
  const char *classes[] = { "dots", "stripes", "blank" };
  char *root = new_dir (name);
  GError *error = NULL;

  for (int c = 0; c < 3; c++)
    {
      char *sub = g_build_filename (root, classes[c], NULL);
      g_assert_cmpint (g_mkdir_with_parents (sub, 0755), ==, 0);
      for (int k = shift; k < shift + per_class; k++)
        {
          GdkPixbuf *pb = gdk_pixbuf_new (GDK_COLORSPACE_RGB, FALSE, 8, 8, 8);
          guint8 *px = gdk_pixbuf_get_pixels (pb);
          int stride = gdk_pixbuf_get_rowstride (pb);
          char name[16], *path;

          for (int y = 0; y < 8; y++)
            for (int x = 0; x < 8; x++)
              for (int ch = 0; ch < 3; ch++)
                px[y * stride + x * 3 + ch] =
                  c == 0 ? ((x + y + k) % 3 == 0) * 255
                  : c == 1 ? (y % 2) * 200 + ch * 20 : 30 + k * 10;
          g_snprintf (name, sizeof name, "%d.png", k);
          path = g_build_filename (sub, name, NULL);
          gdk_pixbuf_save (pb, path, "png", &error, NULL);
          g_assert_no_error (error);
          g_free (path);
          g_object_unref (pb);
        }
      g_free (sub);
    }
  return root;
}

static char *
write_image_folder (void)
{
  return write_image_folder_named ("images", 4, 0);
}

/* Ctrl-C during training: exit 1 saying so, with the checkpoint, the
 * model and the loss plot of the steps done. */
static void
test_train_interrupted (void)
{
  char *data = write_image_folder ();
  char *dir = new_dir ("interrupted");
  char *unet = g_build_filename (dir, "unet.safetensors", NULL);
  char *ckpt = g_build_filename (dir, "unet.ckpt", NULL);
  char *csv = g_build_filename (dir, "loss.csv", NULL);
  char *plot = g_build_filename (dir, "loss.png", NULL);
  const char *argv[] = { diffuse, TRAIN1, "--data", data, "--size", "8",
                         "--channels", "4,4", "--attention", "0,0",
                         "--groups", "2", "--head-dim", "4", "--steps",
                         "10000000", "--batch",
                         "2", "--checkpoint", ckpt, "--checkpoint-minutes",
                         "60", "--log", csv, "--plot", plot, "--out", unet,
                         "--quiet", NULL };
  GError *error = NULL;
  GString *err = g_string_new (NULL);
  char buf[4096], *text;
  int err_fd, status, rows = 0, w, h, depth, ctype;
  gssize got;
  GPid pid;

  if (!g_spawn_async_with_pipes (NULL, (char **) argv, NULL,
                                 G_SPAWN_DO_NOT_REAP_CHILD, NULL, NULL, &pid,
                                 NULL, NULL, &err_fd, &error))
    g_error ("cannot run %s: %s", diffuse, error->message);

  /* Wait for a few logged steps (at most a minute), then interrupt. */
  for (int i = 0; i < 3000 && rows < 4; i++)
    {
      g_usleep (20000);
      g_assert_cmpint (waitpid (pid, &status, WNOHANG), ==, 0);
      if (g_file_get_contents (csv, &text, NULL, NULL))
        {
          rows = 0;
          for (char *c = text; *c; c++)
            rows += *c == '\n';
          g_free (text);
        }
    }
  g_assert_cmpint (rows, >=, 4);
  g_assert_cmpint (kill (pid, SIGINT), ==, 0);
  while ((got = read (err_fd, buf, sizeof buf)) > 0)
    g_string_append_len (err, buf, got);
  close (err_fd);
  g_assert_cmpint (waitpid (pid, &status, 0), ==, pid);
  g_spawn_close_pid (pid);
  g_test_message ("%s", err->str);

  g_assert_true (WIFEXITED (status));
  g_assert_cmpint (WEXITSTATUS (status), ==, 1);
  g_assert_nonnull (strstr (err->str, "training cancelled after step"));
  g_assert_nonnull (strstr (err->str, "loss so far in"));
  g_assert_true (g_file_test (ckpt, G_FILE_TEST_IS_REGULAR));
  g_assert_true (g_file_test (unet, G_FILE_TEST_IS_REGULAR));
  png_header (dir, "loss.png", &w, &h, &depth, &ctype);
  g_assert_cmpint (w, >, 100);

  g_string_free (err, TRUE);
  g_free (data);
  g_free (dir);
  g_free (unet);
  g_free (ckpt);
  g_free (csv);
  g_free (plot);
}

/* eval of the models test_train_and_eval makes, 6 samples at steps steps
 * against train floor images, with more arguments. */
static Run
run_eval_small (const char *unet, const char *cls, const char *data,
                const char *test, const char *steps, const char *train,
                const char *const *more)
{
  const char *args[24] = { EVAL1, "--model", unet, "--classifier", cls,
                           "--data", data, "--test-data", test, "--count",
                           "6", "--steps", steps, "--train-count", train,
                           "--quiet" };
  int n = 18;

  for (int i = 0; more[i] != NULL && n < 23; i++)
    args[n++] = more[i];
  args[n] = NULL;
  return run_argv (args);
}

#define EVAL_SMALL(steps, train, ...) \
  run_eval_small (unet, cls, data, test, steps, train, \
                  (const char *const[]) { __VA_ARGS__, NULL })

static void
test_train_and_eval (void)
{
  char *data = write_image_folder ();
  char *test = write_image_folder_named ("images-test", 2, 4);
  char *dir = new_dir ("train");
  char *unet = g_build_filename (dir, "unet.safetensors", NULL);
  char *cls = g_build_filename (dir, "cls.safetensors", NULL);
  char *csv = g_build_filename (dir, "loss.csv", NULL);
  char *plot = g_build_filename (dir, "loss.png", NULL);
  char *text, **rows;
  int w, h, depth, ctype, n_rows = 0;
  GError *error = NULL;
  DfModel *m;
  Run r;

  r = RUN (TRAIN1, "--data", data, "--size", "8", "--channels", "4,4",
           "--attention", "0,1", "--groups", "2", "--head-dim", "4",
           "--steps", "4", "--batch", "2", "--log", csv, "--plot", plot,
           "--out", unet, "--quiet");
  assert_ok (&r);
  run_clear (&r);

  /* A class-conditional RGB UNet with the folder's classes + uncond. */
  m = df_model_load (unet, &error);
  g_assert_no_error (error);
  g_assert_false (df_model_is_classifier (m));
  g_assert_cmpint (df_model_channels (m), ==, 3);
  g_assert_cmpint (df_model_size (m), ==, 8);
  g_assert_cmpint (df_model_num_classes (m), ==, 3);
  g_assert_cmpint (df_model_uncond_class (m), ==, 3);
  g_assert_cmpint (df_model_class_lookup (m, "stripes"), >=, 0);
  df_model_free (m);

  g_file_get_contents (csv, &text, NULL, &error);
  g_assert_no_error (error);
  rows = g_strsplit (text, "\n", -1);
  for (int i = 0; rows[i]; i++)
    n_rows += g_ascii_isdigit (rows[i][0]);
  g_assert_cmpint (n_rows, ==, 4);
  g_strfreev (rows);
  g_free (text);
  png_header (dir, "loss.png", &w, &h, &depth, &ctype);
  g_assert_cmpint (w, >, 100);

  r = RUN (TRAIN1, "--task", "classifier", "--data", data, "--size", "8",
           "--channels", "4,4", "--attention", "0,1", "--groups", "2",
           "--head-dim", "4", "--steps", "3", "--batch", "2", "--out", cls,
           "--quiet");
  assert_ok (&r);
  run_clear (&r);
  m = df_model_load (cls, &error);
  g_assert_no_error (error);
  g_assert_true (df_model_is_classifier (m));
  g_assert_cmpint (df_model_num_classes (m), ==, 3);
  df_model_free (m);

  r = EVAL_SMALL ("3", "12", NULL);
  assert_ok (&r);
  g_test_message ("%s", r.out);
  g_assert_nonnull (strstr (r.out, "accuracy: "));
  g_assert_nonnull (strstr (r.out, "of 6 asked classes"));
  g_assert_nonnull (strstr (r.out, "frechet distance: "));
  g_assert_nonnull (strstr (r.out, "frechet floor: "));
  g_assert_nonnull (strstr (r.out, "(12 training images vs"));
  /* 6 samples against 12 floor images: the floor at 6 images too */
  g_assert_nonnull (strstr (r.out, "frechet floor at the sample count: "));
  g_assert_nonnull (strstr (r.out, "(6 training images vs"));
  /* The default interval and how many steps it guided (sigma 9.5, 1.5,
   * 0.01 at 3 leading steps). */
  g_assert_nonnull (strstr (r.out, "at sigma in (0.28, 3] (1 of the 3 "
                                   "steps)"));
  run_clear (&r);

  r = EVAL_SMALL ("3", "6", "--guidance-interval", "0,inf");
  assert_ok (&r);
  g_assert_nonnull (strstr (r.out, "scale 3 at every step, seed 0"));
  run_clear (&r);
  r = EVAL_SMALL ("3", "6", "--guidance-interval", "500,inf");
  assert_one_line_error (&r, "--guidance-interval 500,inf holds none of the "
                             "3 steps'");
  run_clear (&r);
  r = EVAL_SMALL ("2", "6", "--guidance-scale", "3");
  assert_one_line_error (&r, "--guidance-scale 3 has no effect: none of the "
                             "2 steps");
  run_clear (&r);
  r = EVAL_SMALL ("3", "6", "--guidance-scale", "1", "--guidance-interval",
                  "0.5,2");
  assert_one_line_error (&r, "--guidance-interval 0.5,2 has no effect at "
                             "guidance scale 1");
  run_clear (&r);

  r = EVAL_SMALL ("3", "6", NULL);
  assert_ok (&r);
  g_assert_nonnull (strstr (r.out, "(6 training images vs"));
  g_assert_null (strstr (r.out, "at the sample count"));
  run_clear (&r);

  g_free (data);
  g_free (test);
  g_free (dir);
  g_free (unet);
  g_free (cls);
  g_free (csv);
  g_free (plot);
}

/* A --config whose class count is another data set's is refused; the
 * data's own count (3 classes + the unconditional label) is taken. */
static void
test_train_config_classes (void)
{
  char *data = write_image_folder ();
  char *dir = new_dir ("train-config");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  char *json = g_build_filename (dir, "unet.json", NULL);
  DfUNetConfig cfg;
  GError *error = NULL;
  Run r;

  for (int classes = 11; classes >= 4; classes -= 7)
    {
      JsonGenerator *gen = json_generator_new ();
      JsonNode *node;

      df_unet_config_init (&cfg);
      cfg.sample_size = 8;
      cfg.in_channels = cfg.out_channels = 3;
      cfg.n_blocks = 2;
      cfg.block_out_channels[0] = cfg.block_out_channels[1] = 4;
      cfg.norm_num_groups = 2;
      cfg.attention_head_dim = 4;
      cfg.num_class_embeds = classes;
      node = df_unet_config_to_json (&cfg);
      json_generator_set_root (gen, node);
      g_assert_true (json_generator_to_file (gen, json, &error));
      g_assert_no_error (error);
      json_node_unref (node);
      g_object_unref (gen);

      r = RUN (TRAIN1, "--data", data, "--config", json, "--steps", "1",
               "--batch", "2", "--out", out, "--quiet");
      if (classes == 11)
        {
          assert_one_line_error (&r, "--config ");
          g_assert_nonnull (strstr (r.err, "num_class_embeds is 11, but "));
          g_assert_nonnull (strstr (r.err, "has 3 classes (and the "
                                           "unconditional label): give 4"));
          g_assert_false (g_file_test (out, G_FILE_TEST_EXISTS));
        }
      else
        assert_ok (&r);
      run_clear (&r);
    }
  g_free (json);
  g_free (out);
  g_free (dir);
  g_free (data);
}

static void
test_train_bad (void)
{
  char *dir = new_dir ("train-bad");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  char *nodata = g_build_filename (dir, "no-such-folder", NULL);
  Run r;

  r = RUN ("train", "--data", nodata, "--out", out, "--quiet");
  assert_one_line_error (&r, "no-such-folder");
  g_assert_nonnull (strstr (r.err, "no such folder"));
  run_clear (&r);
  g_assert_true (g_file_set_contents (nodata, "", 0, NULL));
  r = RUN ("train", "--data", nodata, "--out", out, "--quiet");
  assert_one_line_error (&r, "--data ");
  g_assert_nonnull (strstr (r.err, "no-such-folder is a file: give a folder"));
  run_clear (&r);
  g_assert_cmpint (g_unlink (nodata), ==, 0);
  r = RUN ("train", "--data", dir, "--steps", "0", "--out", out);
  assert_one_line_error (&r, "--steps");
  run_clear (&r);
  r = RUN ("train", "--data", dir, "--task", "gan", "--out", out);
  assert_one_line_error (&r, "gan");
  run_clear (&r);
  r = RUN ("train", "--data", dir, "--resume", "--out", out);
  assert_one_line_error (&r, "--checkpoint");
  run_clear (&r);
  r = RUN ("train", "--data", dir, "--channels", "32,x", "--out", out);
  assert_one_line_error (&r, "--channels");
  run_clear (&r);
  g_assert_cmpint (count_entries (dir), ==, 0);
  g_free (out);
  g_free (nodata);
  g_free (dir);
}


/* ---- explicit options that do something keep working ---- */

static void
test_generate_explicit_options (void)
{
  const char *cases[][10] = {
    { "--sampler", "ddpm", "--variance", "fixed_large" },
    { "--sampler", "ddpm", "--variance", "fixed_small" },
    { "--sampler", "ddim", "--eta", "1" },
    { "--eta", "0" },
    { "--class", "1", "--guidance-scale", "2" },
    { "--class", "1", "--guidance", "free", "--guidance-scale", "0" },
    { "--class", "1", "--guidance", "none" },
    { "--class", "2", "--guidance", "classifier", "--classifier", "@cls",
      "--guidance-scale", "2" },
    { "--class", "1", "--guidance-interval", "0.5,inf" },
    { "--class", "2", "--guidance", "classifier", "--classifier", "@cls",
      "--guidance-interval", "0,3" },
  };

  for (gsize i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      char *dir = new_dir ("explicit");
      const char *args[24] = { GENERATE1, "--model", gray_model, "--count",
                               "1", "--steps", "5", "--quiet", "--out", dir };
      int n = 12;
      Run r;

      for (int k = 0; cases[i][k]; k++)
        args[n++] = strcmp (cases[i][k], "@cls") == 0 ? gray_classifier
                                                       : cases[i][k];
      args[n] = NULL;
      r = run_argv (args);
      assert_ok (&r);
      g_assert_cmpint (count_entries (dir), ==, 2);
      run_clear (&r);
      g_free (dir);
    }

  /* Without --guidance-scale a model without an unconditional class
   * samples its class unguided, as before. */
  {
    char *dir = new_dir ("explicit");
    Run r = RUN (GENERATE1, "--model", nouncond_model, "--class", "1",
                 "--count", "1", "--steps", "2", "--quiet", "--out", dir);

    assert_ok (&r);
    run_clear (&r);
    g_free (dir);
  }
}

/* The leak was GOption dropping the default --out (and --seed) string when
 * the option was given: 4 bytes a run. */
static void
test_generate_no_leak (void)
{
  char *valgrind = g_find_program_in_path ("valgrind");
  char *dir = new_dir ("leak");
  const char *argv[] = { NULL, "--leak-check=full",
                         "--errors-for-leak-kinds=definite",
                         "--error-exitcode=99", "-q", diffuse, GENERATE1,
                         "--model", gray_model, "--count", "1", "--steps",
                         "1", "--seed", "5", "--out", dir, "--quiet", NULL };
  char *out = NULL, *err = NULL;
  GError *error = NULL;
  int wait;

  if (valgrind == NULL)
    {
      g_test_skip ("no valgrind");
      g_free (dir);
      return;
    }
  argv[0] = valgrind;
  if (!g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
                     &out, &err, &wait, &error))
    g_error ("cannot run %s: %s", valgrind, error->message);
  g_test_message ("valgrind: %s", err);
  g_assert_true (WIFEXITED (wait));
  g_assert_cmpint (WEXITSTATUS (wait), ==, 0);
  g_assert_null (strstr (err, "definitely lost"));
  g_assert_cmpint (count_entries (dir), ==, 2);
  g_free (out);
  g_free (err);
  g_free (dir);
  g_free (valgrind);
}

/* ---- generate: classes, the output folder, messages ---- */

/* A classifier of other classes steered towards whatever its logit of that
 * index meant, and sampling went ahead. */
static void
test_generate_classifier_classes (void)
{
  char *dir = new_dir ("gen-classifier-classes");
  char *out = g_build_filename (dir, "out", NULL);
  Run r;

  /* No --quiet: one line means it stopped before the first step. */
  r = RUN (GENERATE1, "--model", gray_model, "--count", "1", "--steps", "2",
           "--class", "circle", "--guidance", "classifier", "--classifier",
           fruit_classifier, "--out", out);
  assert_one_line_error (&r, "has classes apple, banana, cherry; the model ");
  g_assert_nonnull (strstr (r.err, fruit_classifier));
  g_assert_nonnull (strstr (r.err, "has circle, square, cross"));
  run_clear (&r);

  /* Fewer classes, the asked one among them: still not the model's. */
  r = RUN (GENERATE1, "--model", gray_model, "--count", "1", "--steps", "2",
           "--class", "circle", "--guidance", "classifier", "--classifier",
           pair_classifier, "--out", out);
  assert_one_line_error (&r, "has 2 classes (circle, square); the model ");
  g_assert_nonnull (strstr (r.err, "has 3 (circle, square, cross)"));
  run_clear (&r);
  g_assert_cmpint (count_entries (dir), ==, 0);

  /* A classifier without names has only its count to agree on. */
  r = RUN (GENERATE1, "--model", gray_model, "--count", "1", "--steps", "2",
           "--class", "square", "--guidance", "classifier", "--classifier",
           unnamed_classifier, "--out", out, "--quiet");
  assert_ok (&r);
  g_assert_cmpint (count_entries (out), ==, 2);
  run_clear (&r);
  g_free (out);
  g_free (dir);
}

/* An --out that cannot be created was found only after sampling. */
static void
test_generate_out_under_a_file (void)
{
  char *dir = new_dir ("gen-out-file");
  char *file = g_build_filename (dir, "file", NULL);
  char *sub = g_build_filename (file, "sub", NULL);
  Run r;

  g_assert_true (g_file_set_contents (file, "x", 1, NULL));

  /* Root too: nothing can be created under a regular file.  No --quiet:
   * one line means no sampling step ran. */
  r = RUN (GENERATE1, "--model", gray_model, "--count", "1", "--steps", "2",
           "--out", sub);
  assert_one_line_error (&r, "--out ");
  g_assert_nonnull (strstr (r.err, sub));
  g_assert_nonnull (strstr (r.err, file));
  g_assert_nonnull (strstr (r.err, "is a file, not a folder"));
  run_clear (&r);
  r = RUN (INTERPOLATE1, "--model", gray_model, "--seeds", "1,2",
           "--frames", "2", "--steps", "2", "--out", sub);
  assert_one_line_error (&r, "is a file, not a folder");
  run_clear (&r);
  r = RUN (GENERATE1, "--model", gray_model, "--count", "1", "--steps", "2",
           "--out", file);
  assert_one_line_error (&r, "is a file, not a folder: give a folder");
  run_clear (&r);

  g_assert_cmpint (count_entries (dir), ==, 1);
  g_free (sub);
  g_free (file);
  g_free (dir);
}

static void
test_generate_out_read_only (void)
{
  char *dir = new_dir ("gen-out-read-only");
  char *sub = g_build_filename (dir, "sub", NULL);
  Run r;

  g_assert_cmpint (g_chmod (dir, 0555), ==, 0);
  if (g_access (dir, W_OK) == 0)
    {
      /* Root writes there anyway; out-under-a-file covers root. */
      g_chmod (dir, 0755);
      g_test_skip ("chmod does not stop this user's writes (root)");
      g_free (sub);
      g_free (dir);
      return;
    }
  r = RUN (GENERATE1, "--model", gray_model, "--count", "1", "--steps", "2",
           "--out", dir);
  assert_one_line_error (&r, "cannot write in this folder");
  g_assert_nonnull (strstr (r.err, dir));
  run_clear (&r);
  r = RUN (GENERATE1, "--model", gray_model, "--count", "1", "--steps", "2",
           "--out", sub);
  assert_one_line_error (&r, "cannot create it in");
  g_assert_nonnull (strstr (r.err, sub));
  run_clear (&r);
  g_assert_cmpint (g_chmod (dir, 0755), ==, 0);
  g_assert_cmpint (count_entries (dir), ==, 0);
  g_free (sub);
  g_free (dir);
}

/* One image was "wrote DIR/0000.png to DIR/0000.png". */
static void
test_generate_wrote_message (void)
{
  char *dir = new_dir ("gen-wrote");
  char *want;
  Run r;

  r = RUN (GENERATE1, "--model", gray_model, "--count", "1", "--steps", "1",
           "--out", dir, "--quiet");
  assert_ok (&r);
  want = g_strdup_printf ("generate: wrote %s/0000.png and %s/grid.png\n",
                          dir, dir);
  g_assert_cmpstr (r.out, ==, want);
  g_free (want);
  run_clear (&r);

  r = RUN (GENERATE1, "--model", gray_model, "--count", "3", "--steps", "1",
           "--out", dir, "--quiet");
  assert_ok (&r);
  want = g_strdup_printf ("generate: wrote %s/0000.png to %s/0002.png and "
                          "%s/grid.png\n", dir, dir, dir);
  g_assert_cmpstr (r.out, ==, want);
  g_free (want);
  run_clear (&r);
  g_free (dir);
}

/* The --help line of option in out, or NULL. */
static char *
help_line (const char *out, const char *option)
{
  const char *at = strstr (out, option), *end;

  if (at == NULL)
    return NULL;
  end = strchr (at, '\n');
  return g_strndup (at, end ? (gsize) (end - at) : strlen (at));
}

/* generate takes --batch 0 as automatic where train and eval refuse it:
 * the help said only "default: up to 16". */
static void
test_generate_help_batch_zero (void)
{
  const char *cmds[] = { "generate", "interpolate" };

  for (gsize i = 0; i < G_N_ELEMENTS (cmds); i++)
    {
      Run r = RUN (cmds[i], "--help");
      char *line;

      assert_ok (&r);
      line = help_line (r.out, "--batch");
      g_test_message ("%s", line);
      g_assert_nonnull (line);
      g_assert_nonnull (strstr (line, "default 0: automatic"));
      g_free (line);
      run_clear (&r);
    }
}

/* Class folders named 1, 2, 3: --class 1 is the class named "1" (index
 * 0), and the help says a name comes first. */
static void
test_generate_numeric_class_names (void)
{
  const char *cmds[] = { "generate", "interpolate", "eps" };
  char *a = new_dir ("numeric-name"), *b = new_dir ("numeric-index");
  char *c = new_dir ("numeric-three");
  Run r;

  for (gsize i = 0; i < G_N_ELEMENTS (cmds); i++)
    {
      r = RUN (cmds[i], "--help");
      assert_ok (&r);
      g_assert_nonnull (strstr (r.out, "a name is matched first, then an "
                                "index"));
      run_clear (&r);
    }

  r = RUN (GENERATE1, "--model", numeric_model, "--steps", "3", "--count",
           "1", "--class", "1", "--out", a, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  r = RUN (GENERATE1, "--model", numeric_model, "--steps", "3", "--count",
           "1", "--class", "0", "--out", b, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  assert_same_file (a, b, "0000.png");

  /* "3" is a name here, though index 3 would be out of range. */
  r = RUN (GENERATE1, "--model", numeric_model, "--steps", "3", "--count",
           "1", "--class", "3", "--out", c, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  r = RUN (GENERATE1, "--model", numeric_model, "--steps", "3", "--count",
           "1", "--class", "4", "--out", c, "--quiet");
  assert_one_line_error (&r, "--class 4 is out of range");
  run_clear (&r);
  g_free (a);
  g_free (b);
  g_free (c);
}

/* ---- schedule ---- */

/* The model's schedule has its own T: -T beside --model did nothing. */
static void
test_schedule_timesteps_with_model (void)
{
  Run r = RUN ("schedule", "--model", gray_model, "--timesteps", "500");

  assert_one_line_error (&r, "give --model or --timesteps, not both");
  g_assert_cmpstr (r.out, ==, "");
  run_clear (&r);
  r = RUN ("schedule", "-m", gray_model, "-T", "1000", "--steps", "3");
  assert_one_line_error (&r, "give --model or --timesteps, not both");
  run_clear (&r);

  /* Each alone still works. */
  r = RUN ("schedule", "-T", "500", "--steps", "3");
  assert_ok (&r);
  g_assert_nonnull (strstr (r.out, "T 500, 3 steps"));
  run_clear (&r);
  r = RUN ("schedule", "-m", gray_model, "--steps", "3");
  assert_ok (&r);
  g_assert_nonnull (strstr (r.out, "T 1000, 3 steps"));
  run_clear (&r);
}

/* ---- files named as the user gave them ---- */

/* A one-line error that names path itself, not GLib's temporary
 * "path.XXXXXX". */
static void
assert_names_file (const Run *r, const char *path)
{
  char *temp = g_strconcat (path, ".", NULL);

  assert_one_line_error (r, path);
  g_assert_null (strstr (r->err, temp));
  g_free (temp);
}

/* 250 letters: a legal name whose temporary name (7 more) is too long, so
 * the write fails at the end however the folder is checked. */
static char *
long_name (const char *dir)
{
  char base[251];

  memset (base, 'w', 250);
  base[250] = '\0';
  return g_build_filename (dir, base, NULL);
}

static char *
write_zero_npy (const char *dir)
{
  char *in = g_build_filename (dir, "x.npy", NULL);
  float x[64] = { 0 };

  write_npy (in, "{'descr': '<f4', 'fortran_order': False, "
             "'shape': (1, 1, 8, 8), }", x, 64, 1);
  return in;
}

static void
test_eps_output_names_the_file (void)
{
  char *dir = new_dir ("eps-write");
  char *in = write_zero_npy (dir);
  char *missing = g_build_filename (dir, "no-such-folder", "eps.npy", NULL);
  char *folder = g_build_filename (dir, "a-folder", NULL);
  char *toolong = long_name (dir);
  Run r;

  g_assert_cmpint (g_mkdir (folder, 0755), ==, 0);
  r = RUN ("eps", "--model", gray_model, "--input", in, "--t", "10",
           "--output", missing);
  assert_names_file (&r, missing);
  g_assert_nonnull (strstr (r.err, "no folder"));
  run_clear (&r);

  r = RUN ("eps", "--model", gray_model, "--input", in, "--t", "10",
           "--output", folder);
  assert_names_file (&r, folder);
  g_assert_nonnull (strstr (r.err, "is a folder"));
  run_clear (&r);

  r = RUN ("eps", "--model", gray_model, "--input", in, "--t", "10",
           "--output", toolong);
  assert_names_file (&r, toolong);
  run_clear (&r);

  /* x.npy and the folder, nothing else. */
  g_assert_cmpint (count_entries (dir), ==, 2);
  g_free (in);
  g_free (missing);
  g_free (folder);
  g_free (toolong);
  g_free (dir);
}

/* A write failing at the end named GLib's temporary file, 0000.png.XXXXXX:
 * here the rename onto a folder 0000.png fails. */
static void
test_generate_write_error_names_the_file (void)
{
  char *dir = new_dir ("gen-write");
  char *blocker = g_build_filename (dir, "0000.png", NULL);
  Run r;

  g_assert_cmpint (g_mkdir (blocker, 0755), ==, 0);
  r = RUN (GENERATE1, "--model", gray_model, "--count", "2", "--steps", "1",
           "--out", dir, "--quiet");
  assert_names_file (&r, blocker);
  g_assert_nonnull (strstr (r.err, "writing the results: "));
  g_assert_cmpint (count_entries (dir), ==, 1);
  run_clear (&r);
  g_free (blocker);
  g_free (dir);
}

/* ---- train: bad input ---- */

#define TINY_NET "--size", "8", "--channels", "4,4", "--attention", "0,1", \
                 "--groups", "2", "--head-dim", "4", "--batch", "2"

static void
test_train_write_error_names_the_file (void)
{
  char *data = write_image_folder ();
  char *dir = new_dir ("train-write");
  char *toolong = long_name (dir);
  Run r = RUN (TRAIN1, "--data", data, TINY_NET, "--steps", "1", "--out",
               toolong, "--quiet");

  assert_names_file (&r, toolong);
  g_assert_cmpint (count_entries (dir), ==, 0);
  run_clear (&r);
  g_free (toolong);
  g_free (data);
  g_free (dir);
}

/* Every file train writes is checked before any training: a --plot into a
 * missing folder once failed after the run, with --out already written. */
static void
test_train_output_checked_first (void)
{
  char *data = write_image_folder ();
  char *dir = new_dir ("train-files");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  char *csv = g_build_filename (dir, "loss.csv", NULL);
  char *plot = g_build_filename (dir, "no-such-folder", "loss.png", NULL);
  char *ckpt = g_build_filename (dir, "no-such-folder", "w.ckpt", NULL);
  Run r;

  r = RUN (TRAIN1, "--data", data, TINY_NET, "--steps", "2", "--log", csv,
           "--plot", plot, "--out", out, "--quiet");
  assert_names_file (&r, plot);
  g_assert_true (g_str_has_prefix (r.err, "diffuse: --plot "));
  run_clear (&r);
  r = RUN (TRAIN1, "--data", data, TINY_NET, "--steps", "2", "--checkpoint",
           ckpt, "--out", out, "--quiet");
  assert_names_file (&r, ckpt);
  g_assert_true (g_str_has_prefix (r.err, "diffuse: --checkpoint "));
  run_clear (&r);
  r = RUN (TRAIN1, "--data", data, TINY_NET, "--steps", "2", "--out", dir,
           "--quiet");
  assert_one_line_error (&r, "is a folder: give a file name");
  run_clear (&r);
  g_assert_cmpint (count_entries (dir), ==, 0);
  g_free (data);
  g_free (dir);
  g_free (out);
  g_free (csv);
  g_free (plot);
  g_free (ckpt);
}

/* 0 used to mean "the default" for these; a negative is as wrong, and so
 * is a size the blocks cannot halve. */
static void
test_train_sizes_refused (void)
{
  const char *cases[][3] = {
    { "--size", "0", "--size 0: give 1 or more" },
    { "--size", "-8", "--size -8: give 1 or more" },
    { "--layers", "0", "--layers 0: give 1 or more" },
    { "--layers", "-1", "--layers -1: give 1 or more" },
    { "--head-dim", "0", "--head-dim 0: give 1 or more" },
    { "--groups", "0", "--groups 0: give 1 or more" },
    { "--image-channels", "0", "--image-channels: give 1 (gray) or 3" },
    /* Not 0 either: a size the blocks cannot halve, in the option's terms. */
    { "--size", "27", "--size 27: with 3 blocks the size must be a multiple "
      "of 4" },
  };
  char *data = write_image_folder ();
  char *dir = new_dir ("train-sizes");
  char *out = g_build_filename (dir, "w.safetensors", NULL);

  for (gsize i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      Run r = RUN (TRAIN1, "--data", data, "--steps", "1", cases[i][0],
                   cases[i][1], "--out", out, "--quiet");

      assert_one_line_error (&r, cases[i][2]);
      run_clear (&r);
    }
  g_assert_cmpint (count_entries (dir), ==, 0);
  g_free (out);
  g_free (data);
  g_free (dir);
}

/* --attention is a flag per block; 2 used to count as 1. */
static void
test_train_attention_flags (void)
{
  char *data = write_image_folder ();
  char *dir = new_dir ("train-attention");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  Run r = RUN (TRAIN1, "--data", data, "--size", "8", "--channels", "4,4",
               "--attention", "0,2", "--groups", "2", "--head-dim", "4",
               "--batch", "2", "--steps", "1", "--out", out, "--quiet");

  assert_one_line_error (&r, "--attention 0,2: 2 is not 0 or 1");
  run_clear (&r);

  /* Alone, with the default 3 blocks: the value is what is wrong. */
  r = RUN (TRAIN1, "--data", data, "--attention", "2", "--steps", "1",
           "--out", out, "--quiet");
  assert_one_line_error (&r, "--attention 2: 2 is not 0 or 1");
  run_clear (&r);
  g_assert_cmpint (count_entries (dir), ==, 0);
  g_free (out);
  g_free (data);
  g_free (dir);
}

static void
test_train_p_uncond_classifier (void)
{
  char *data = write_image_folder ();
  char *dir = new_dir ("train-p-uncond");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  Run r = RUN (TRAIN1, "--task", "classifier", "--data", data, TINY_NET,
               "--steps", "1", "--p-uncond", "0.2", "--out", out, "--quiet");

  assert_one_line_error (&r, "--p-uncond 0.2 has no effect with --task "
                         "classifier");
  g_assert_cmpint (count_entries (dir), ==, 0);
  run_clear (&r);
  g_free (out);
  g_free (data);
  g_free (dir);
}

/* An empty class folder was skipped: the classes after it were renumbered
 * and the model had one class fewer than the folder. */
static void
test_train_empty_class_folder (void)
{
  char *data = write_image_folder ();
  char *empty = g_build_filename (data, "empty-class", NULL);
  char *dir = new_dir ("train-empty-class");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  Run r;

  g_assert_cmpint (g_mkdir (empty, 0755), ==, 0);
  r = RUN (TRAIN1, "--data", data, TINY_NET, "--steps", "1", "--out", out,
           "--quiet");
  assert_one_line_error (&r, empty);
  g_assert_nonnull (strstr (r.err, "no PNG or JPEG images"));
  g_assert_cmpint (count_entries (dir), ==, 0);
  run_clear (&r);
  g_free (empty);
  g_free (out);
  g_free (data);
  g_free (dir);
}

static gint64
mtime_ns (const char *path)
{
  GStatBuf st;

  g_assert_cmpint (g_stat (path, &st), ==, 0);
  return (gint64) st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
}

/* Resuming a checkpoint already at --steps trained nothing and rewrote the
 * model and the checkpoint. */
static void
test_train_resume_nothing_to_train (void)
{
  char *data = write_image_folder ();
  char *dir = new_dir ("train-resume");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  char *ckpt = g_build_filename (dir, "w.ckpt", NULL);
  char *csv = g_build_filename (dir, "loss.csv", NULL);
  const char *files[] = { "w.safetensors", "w.ckpt", "loss.csv" };
  GBytes *before[3];
  gint64 times[3];
  Run r;

  r = RUN (TRAIN1, "--data", data, TINY_NET, "--steps", "2", "--checkpoint",
           ckpt, "--resume", "--log", csv, "--out", out, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  for (int i = 0; i < 3; i++)
    {
      char *path = g_build_filename (dir, files[i], NULL);
      before[i] = read_file (dir, files[i]);
      times[i] = mtime_ns (path);
      g_free (path);
    }

  r = RUN (TRAIN1, "--data", data, TINY_NET, "--steps", "2", "--checkpoint",
           ckpt, "--resume", "--log", csv, "--out", out, "--quiet");
  assert_one_line_error (&r, "checkpoint is at step 2, --steps is 2: "
                         "nothing to train");
  g_assert_nonnull (strstr (r.err, ckpt));
  run_clear (&r);
  r = RUN (TRAIN1, "--data", data, TINY_NET, "--steps", "1", "--checkpoint",
           ckpt, "--resume", "--log", csv, "--out", out, "--quiet");
  assert_one_line_error (&r, "checkpoint is at step 2, --steps is 1: "
                         "nothing to train");
  run_clear (&r);

  /* Untouched: same bytes, same modification time. */
  g_assert_cmpint (count_entries (dir), ==, 3);
  for (int i = 0; i < 3; i++)
    {
      char *path = g_build_filename (dir, files[i], NULL);
      GBytes *after = read_file (dir, files[i]);

      g_assert_true (g_bytes_equal (before[i], after));
      g_assert_cmpint (mtime_ns (path), ==, times[i]);
      g_bytes_unref (after);
      g_bytes_unref (before[i]);
      g_free (path);
    }

  /* One step more is training again. */
  r = RUN (TRAIN1, "--data", data, TINY_NET, "--steps", "3", "--checkpoint",
           ckpt, "--resume", "--log", csv, "--out", out, "--quiet");
  assert_ok (&r);
  run_clear (&r);
  g_free (out);
  g_free (ckpt);
  g_free (csv);
  g_free (data);
  g_free (dir);
}

/* ---- train: resuming, output files, sizes, options, help ---- */

/* diffuse train TINY_NET on data with a checkpoint, --resume, and up to
 * three more arguments (NULL ends them). */
static Run
run_resume (const char *data, const char *ckpt, const char *out,
            const char *steps, gboolean quiet, const char *a, const char *b,
            const char *c)
{
  const char *args[40] = { TRAIN1, "--data", data, TINY_NET, "--steps", steps,
                           "--checkpoint", ckpt, "--resume", "--out", out };
  int n = 0;

  while (args[n] != NULL)
    n++;
  if (quiet)
    args[n++] = "--quiet";
  if (a)
    args[n++] = a;
  if (a && b)
    args[n++] = b;
  if (a && b && c)
    args[n++] = c;
  args[n] = NULL;
  return run_argv (args);
}

/* A checkpoint of another run (seed, image size, schedule, data...) was
 * resumed as long as the tensors had the same shapes. */
static void
test_train_resume_refuses_another_run (void)
{
  const char *cases[][3] = {
    { "--seed", "3", "--seed is 3, the checkpoint ran 0" },
    { "--size", "16", "--size is 16, the checkpoint ran 8" },
    { "--hflip", NULL, "--hflip is on, the checkpoint ran off" },
    { "--batch", "3", "--batch is 3, the checkpoint ran 2" },
    { "--p-uncond", "0.2", "--p-uncond is 0.2, the checkpoint ran 0.1" },
    { "--timesteps", "500", "--timesteps is 500, the checkpoint ran 1000" },
    { "--beta-schedule", "cosine", "--beta-schedule is squaredcos_cap_v2, "
      "the checkpoint ran linear" },
  };
  char *data = write_image_folder ();
  char *other = write_image_folder_named ("images-other", 2, 0);
  char *dir = new_dir ("train-other-run");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  char *ckpt = g_build_filename (dir, "w.ckpt", NULL);
  GBytes *ck_before, *out_before, *after;
  Run r;

  r = run_resume (data, ckpt, out, "1", TRUE, NULL, NULL, NULL);
  assert_ok (&r);
  run_clear (&r);
  ck_before = read_file (dir, "w.ckpt");
  out_before = read_file (dir, "w.safetensors");

  for (gsize i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      r = run_resume (data, ckpt, out, "2", TRUE, cases[i][0], cases[i][1],
                      NULL);
      assert_one_line_error (&r, cases[i][2]);
      g_assert_nonnull (strstr (r.err, ckpt));
      run_clear (&r);
    }
  r = run_resume (other, ckpt, out, "2", TRUE, NULL, NULL, NULL);
  assert_one_line_error (&r, "--data has 6 images, the checkpoint ran 12");
  run_clear (&r);

  /* Nothing written. */
  g_assert_cmpint (count_entries (dir), ==, 2);
  after = read_file (dir, "w.ckpt");
  g_assert_true (g_bytes_equal (ck_before, after));
  g_bytes_unref (after);
  after = read_file (dir, "w.safetensors");
  g_assert_true (g_bytes_equal (out_before, after));
  g_bytes_unref (after);

  /* The same run goes on. */
  r = run_resume (data, ckpt, out, "2", TRUE, NULL, NULL, NULL);
  assert_ok (&r);
  run_clear (&r);
  g_bytes_unref (ck_before);
  g_bytes_unref (out_before);
  g_free (data);
  g_free (other);
  g_free (out);
  g_free (ckpt);
  g_free (dir);
}

/* Options a run may change on resume changed without a word. */
static void
test_train_resume_reports_changes (void)
{
  char *data = write_image_folder ();
  char *dir = new_dir ("train-resume-changes");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  char *ckpt = g_build_filename (dir, "w.ckpt", NULL);
  Run r;

  r = run_resume (data, ckpt, out, "2", TRUE, NULL, NULL, NULL);
  assert_ok (&r);
  run_clear (&r);

  r = run_resume (data, ckpt, out, "3", FALSE, "--lr", "5e-4", NULL);
  assert_ok (&r);
  g_test_message ("%s", r.err);
  g_assert_nonnull (strstr (r.err, "train: resuming with --lr 0.0005 (the "
                            "checkpoint ran 0.0002)\n"));
  g_assert_nonnull (strstr (r.err, "train: resuming with --steps 3 (the "
                            "checkpoint ran 2)\n"));
  g_assert_nonnull (strstr (r.err, "resumed at step 2\n"));
  run_clear (&r);

  /* Not with --quiet. */
  r = run_resume (data, ckpt, out, "4", TRUE, "--lr", "1e-4", NULL);
  assert_ok (&r);
  g_assert_null (strstr (r.err, "resuming with"));
  run_clear (&r);
  g_free (data);
  g_free (out);
  g_free (ckpt);
  g_free (dir);
}

/* --resume with a checkpoint path that does not exist (a typo) started
 * from step 0 without a word. */
static void
test_train_resume_no_checkpoint_yet (void)
{
  char *data = write_image_folder ();
  char *dir = new_dir ("train-resume-new");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  char *ckpt = g_build_filename (dir, "w.ckpt", NULL);
  char *expect = g_strdup_printf ("train: no checkpoint at %s yet: starting "
                                  "at step 0\n", ckpt);
  Run r;

  r = run_resume (data, ckpt, out, "1", FALSE, NULL, NULL, NULL);
  assert_ok (&r);
  g_assert_nonnull (strstr (r.err, expect));
  run_clear (&r);

  /* Now there is one; and --quiet says nothing. */
  r = run_resume (data, ckpt, out, "2", FALSE, NULL, NULL, NULL);
  assert_ok (&r);
  g_assert_null (strstr (r.err, "no checkpoint"));
  run_clear (&r);
  g_remove (ckpt);
  r = run_resume (data, ckpt, out, "1", TRUE, NULL, NULL, NULL);
  assert_ok (&r);
  g_assert_cmpstr (r.err, ==, "");
  run_clear (&r);
  g_free (expect);
  g_free (data);
  g_free (out);
  g_free (ckpt);
  g_free (dir);
}

/* Two outputs on one file overwrote each other: the same name, written
 * two ways, through a linked folder or a hard link. */
static void
test_train_outputs_distinct (void)
{
  char *data = write_image_folder ();
  char *dir = new_dir ("train-same-file");
  char *sub = g_build_filename (dir, "sub", NULL);
  char *linked = g_build_filename (dir, "link", NULL);
  char *w = g_build_filename (dir, "w.safetensors", NULL);
  char *w_dot = g_build_filename (dir, ".", "w.safetensors", NULL);
  char *w_link = g_build_filename (linked, "w.safetensors", NULL);
  char *csv = g_build_filename (dir, "loss.csv", NULL);
  char *csv_up = g_build_filename (sub, "..", "loss.csv", NULL);
  char *hard = g_build_filename (dir, "hard.csv", NULL);
  const char *cases[][4] = {
    { "--log", w, "--out", w },
    { "--checkpoint", w_dot, "--out", w },
    { "--checkpoint", w_link, "--out", w },
    { "--plot", csv_up, "--log", csv },
    { "--plot", hard, "--log", csv },
  };
  Run r;

  g_assert_cmpint (g_mkdir (sub, 0755), ==, 0);
  g_assert_cmpint (symlink (dir, linked), ==, 0);
  g_assert_true (g_file_set_contents (csv, "", 0, NULL));
  g_assert_cmpint (link (csv, hard), ==, 0);
  for (gsize i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      const char *out = strcmp (cases[i][2], "--out") == 0 ? cases[i][3] : w;
      const char *log = strcmp (cases[i][2], "--log") == 0 ? cases[i][3]
                        : NULL;
      const char *args[32] = { TRAIN1, "--data", data, TINY_NET, "--steps",
                               "1", "--quiet", "--out", out, cases[i][0],
                               cases[i][1] };
      int n = 0;

      while (args[n] != NULL)
        n++;
      if (log)
        {
          args[n++] = "--log";
          args[n++] = log;
        }
      r = run_argv (args);
      assert_one_line_error (&r, "are the same file");
      g_assert_nonnull (strstr (r.err, cases[i][0]));
      g_assert_nonnull (strstr (r.err, cases[i][2]));
      run_clear (&r);
    }

  /* Nothing written: sub, link, loss.csv and hard.csv as before. */
  g_assert_cmpint (count_entries (dir), ==, 4);
  g_free (data);
  g_free (sub);
  g_free (linked);
  g_free (w);
  g_free (w_dot);
  g_free (w_link);
  g_free (csv);
  g_free (csv_up);
  g_free (hard);
  g_free (dir);
}

static void
limit_address_space (gpointer data)
{
  struct rlimit rl;

  getrlimit (RLIMIT_AS, &rl);
  rl.rlim_cur = *(rlim_t *) data;
  setrlimit (RLIMIT_AS, &rl);
}

/* Sizes that need more memory than there is aborted inside GLib ("failed
 * to allocate 160000000000 bytes", SIGTRAP): now bounds, or an estimate
 * before anything is allocated. */
static void
test_train_too_big (void)
{
  const char *cases[][3] = {
    { "--channels", "100000,32", "--channels 100000,32: 100000 is too many" },
    { "--batch", "100000000", "--batch: give at most 65536" },
    { "--size", "100000", "--size 100000: give at most 4096" },
    { "--channels", "16384,16384", "train: this network at batch 64 needs "
      "about " },
    { "--batch", "65536", "train: this network at batch 65536 needs about " },
    { "--size", "4096", "train: this network at batch 64 needs about " },
  };
  char *data = write_image_folder ();
  char *dir = new_dir ("train-too-big");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  const char *args[] = { diffuse, TRAIN1, "--data", data, "--size", "64",
                         "--steps", "1", "--out", out, "--quiet", NULL };
  double phys = (double) sysconf (_SC_PHYS_PAGES) * sysconf (_SC_PAGESIZE);
  rlim_t two_gib = (rlim_t) 2 << 30;
  GError *error = NULL;
  int wait;
  Run r = { -1, NULL, NULL };

  for (gsize i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      r = RUN (TRAIN1, "--data", data, cases[i][0], cases[i][1], "--steps",
               "1", "--out", out, "--quiet");
      assert_one_line_error (&r, cases[i][2]);
      if (i >= 3)
        g_assert_nonnull (strstr (r.err, " GiB (use a smaller --batch, "
                                  "--size or --channels)"));
      run_clear (&r);
    }

  /* Under ulimit -v 2 GiB: 64 x 64 at batch 64 needs about 7.6 GiB. */
  if (!g_spawn_sync (NULL, (char **) args, NULL, G_SPAWN_DEFAULT,
                     limit_address_space, &two_gib, &r.out, &r.err, &wait,
                     &error))
    g_error ("cannot run %s: %s", diffuse, error->message);
  r.status = WIFEXITED (wait) ? WEXITSTATUS (wait) : -1;
  assert_one_line_error (&r, "train: this network at batch 64 needs about ");
  if (phys > 16.0 * (1 << 30))
    g_assert_nonnull (strstr (r.err, "the address-space limit (ulimit -v) "
                              "leaves "));
  run_clear (&r);
  g_assert_cmpint (count_entries (dir), ==, 0);
  g_free (data);
  g_free (out);
  g_free (dir);
}

/* --checkpoint-minutes without --checkpoint, and a weight decay that is
 * not finite (it diverged at step 2, saying to resume from a checkpoint
 * that did not exist), were taken. */
static void
test_train_minutes_and_weight_decay (void)
{
  const char *cases[][3] = {
    { "--checkpoint-minutes", "5", "--checkpoint-minutes sets how often "
      "--checkpoint is written: give --checkpoint PATH too" },
    { "--weight-decay", "inf", "--weight-decay: give a finite weight decay" },
    { "--weight-decay", "nan", "--weight-decay: give a finite weight decay" },
    { "--weight-decay", "-0.5", "--weight-decay: give a finite weight decay" },
    { "--weight-decay", "1e4", "--weight-decay: with this --lr it would "
      "shrink the weights" },
  };
  char *data = write_image_folder ();
  char *dir = new_dir ("train-minutes");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  Run r;

  for (gsize i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      r = RUN (TRAIN1, "--data", data, TINY_NET, "--steps", "2", "--out", out,
               "--quiet", cases[i][0], cases[i][1]);
      assert_one_line_error (&r, cases[i][2]);
      run_clear (&r);
    }
  g_assert_cmpint (count_entries (dir), ==, 0);
  g_free (data);
  g_free (out);
  g_free (dir);
}

/* The line of train --help that shows option ("--lr="). */
static char *
train_help_line (const char *help, const char *option)
{
  char **lines = g_strsplit (help, "\n", -1);
  char *found = NULL;

  for (int i = 0; lines[i] != NULL && found == NULL; i++)
    if (strstr (lines[i], option) != NULL)
      found = g_strdup (lines[i]);
  g_strfreev (lines);
  g_assert_nonnull (found);
  return found;
}

/* --help left out most defaults, said "default 0,0,1" for --attention
 * (the default is the last block, however many there are) and "Append"
 * for --log (a fresh run empties it). */
static void
test_train_help_defaults (void)
{
  DfTrainOptions d;
  char *expect[11][2];
  char *line;
  Run r = RUN ("train", "--help");

  assert_ok (&r);
  df_train_options_init (&d);
  expect[0][0] = g_strdup ("--steps=");
  expect[0][1] = g_strdup_printf ("(default %d)", d.steps);
  expect[1][0] = g_strdup ("--batch=");
  expect[1][1] = g_strdup_printf ("(default %d)", d.batch);
  expect[2][0] = g_strdup ("--lr=");
  expect[2][1] = g_strdup_printf ("(default %g)", d.lr);
  expect[3][0] = g_strdup ("--warmup=");
  expect[3][1] = g_strdup_printf ("(default %d)", d.warmup);
  expect[4][0] = g_strdup ("--lr-schedule=");
  expect[4][1] = g_strdup (d.lr_schedule == DF_LR_COSINE
                           ? "(default cosine)" : "(default constant)");
  expect[5][0] = g_strdup ("--ema=");
  expect[5][1] = g_strdup_printf ("(default %g)", d.ema_decay);
  expect[6][0] = g_strdup ("--grad-clip=");
  expect[6][1] = g_strdup_printf ("default %g)", d.grad_clip);
  expect[7][0] = g_strdup ("--p-uncond=");
  expect[7][1] = g_strdup_printf ("(default %g)", d.p_uncond);
  expect[8][0] = g_strdup ("--seed=");
  expect[8][1] = g_strdup_printf ("(default %" G_GUINT64_FORMAT ")", d.seed);
  expect[9][0] = g_strdup ("--weight-decay=");
  expect[9][1] = g_strdup_printf ("(default %g)", d.weight_decay);
  expect[10][0] = g_strdup ("--checkpoint-minutes=");
  expect[10][1] = g_strdup_printf ("(default %g;", d.checkpoint_minutes);
  for (int i = 0; i < 11; i++)
    {
      line = train_help_line (r.out, expect[i][0]);
      g_test_message ("%s", line);
      g_assert_nonnull (strstr (line, expect[i][1]));
      g_free (line);
      g_free (expect[i][0]);
      g_free (expect[i][1]);
    }
  line = train_help_line (r.out, "--attention=");
  g_assert_null (strstr (line, "(default 0,0,1)"));
  g_assert_nonnull (strstr (line, "last block only"));
  g_free (line);
  line = train_help_line (r.out, "--log=");
  g_assert_null (strstr (line, "Append"));
  g_assert_nonnull (strstr (line, "a fresh run starts it anew"));
  g_free (line);
  run_clear (&r);
}

/* "1 classes" in the banner. */
static void
test_train_banner_one_class (void)
{
  char *data = write_image_folder ();
  char *one = g_build_filename (data, "dots", NULL);
  char *dir = new_dir ("train-one-class");
  char *out = g_build_filename (dir, "w.safetensors", NULL);
  Run r = RUN (TRAIN1, "--data", one, TINY_NET, "--steps", "1", "--out",
               out);

  assert_ok (&r);
  g_test_message ("%s", r.err);
  g_assert_nonnull (strstr (r.err, " parameters, 4 images of 3 x 8 x 8, "
                            "1 class\n"));
  run_clear (&r);
  r = RUN (TRAIN1, "--data", data, TINY_NET, "--steps", "1", "--out", out);
  assert_ok (&r);
  g_assert_nonnull (strstr (r.err, ", 12 images of 3 x 8 x 8, 3 classes\n"));
  run_clear (&r);
  g_free (data);
  g_free (one);
  g_free (out);
  g_free (dir);
}

/* ---- eval: the test set and the counts ---- */

/* eval on the fixtures: 12 training images (4 a class), and 6 test images
 * when test is given; extra arguments after. */
static Run
run_eval (const char *data, const char *test, const char *a, const char *b)
{
  const char *args[24] = { EVAL1, "--model", folder_model, "--classifier",
                           folder_classifier, "--data", data, "--count", "6",
                           "--steps", "1", "--quiet" };
  int n = 14;

  if (test)
    {
      args[n++] = "--test-data";
      args[n++] = test;
    }
  if (a)
    {
      args[n++] = a;
      args[n++] = b;
    }
  args[n] = NULL;
  return run_argv (args);
}

/* A folder of images is one set: as --data alone it was both the test set
 * and the training set, and the floor was 0. */
static void
test_eval_folder_needs_test_data (void)
{
  char *data = write_image_folder ();
  char *test = write_image_folder_named ("images-test", 2, 4);
  char *alias = g_build_filename (data, "..", "images", NULL);
  Run r;

  r = run_eval (data, NULL, NULL, NULL);
  assert_one_line_error (&r, "--test-data");
  g_assert_nonnull (strstr (r.err, data));
  g_assert_cmpstr (r.out, ==, "");
  run_clear (&r);

  r = run_eval (data, alias, NULL, NULL);
  assert_one_line_error (&r, "is the --data folder");
  run_clear (&r);

  /* With a test set: its 6 images, all 12 training images (the default
   * 10000 is more than there are), and a floor above 0. */
  r = run_eval (data, test, NULL, NULL);
  assert_ok (&r);
  g_test_message ("%s", r.out);
  g_assert_nonnull (strstr (r.out, "vs 6 test images"));
  g_assert_nonnull (strstr (r.out, "(12 training images vs"));
  g_assert_null (strstr (r.out, "frechet floor: 0 "));
  run_clear (&r);
  g_free (alias);
  g_free (test);
  g_free (data);
}

static void
put_be32 (GByteArray *b, guint32 v)
{
  guint8 d[4] = { v >> 24, v >> 16, v >> 8, v };

  g_byte_array_append (b, d, 4);
}

/* An IDX folder (the Fashion-MNIST layout) of 8 x 8 images: n_train in
 * train-*, n_test in t10k-*, labels 0..2 in turn. */
static char *write_idx_ordered (int n_train, int n_test, int order,
                                const char *dir);

static char *
write_idx_folder (int n_train, int n_test)
{
  return write_idx_ordered (n_train, n_test, 0, "idx");
}

static char *
write_idx_ordered (int n_train, int n_test, int order, const char *dir)
{
  const char *prefixes[] = { "train", "t10k" };
  char *root = new_dir (dir);
  GError *error = NULL;

  for (int s = 0; s < 2; s++)
    {
      int n = s == 0 ? n_train : n_test;
      GByteArray *img = g_byte_array_new (), *lab = g_byte_array_new ();
      char *name, *path;

      put_be32 (img, 0x00000803);
      put_be32 (img, n);
      put_be32 (img, 8);
      put_be32 (img, 8);
      put_be32 (lab, 0x00000801);
      put_be32 (lab, n);
      for (int i = 0; i < n; i++)
        {
          /* order 0: classes in turn, every image its own; 1: the same
           * with one image per class; 2: that sorted by class. */
          guint8 label = order == 2 && s == 0 ? i * 3 / n : i % 3;
          int who = order == 0 || s == 1 ? i : 5 * label;

          for (int k = 0; k < 64; k++)
            {
              guint8 v = (k * 7 + who * 13 + s * 29) % 256;
              g_byte_array_append (img, &v, 1);
            }
          g_byte_array_append (lab, &label, 1);
        }
      name = g_strdup_printf ("%s-images-idx3-ubyte", prefixes[s]);
      path = g_build_filename (root, name, NULL);
      g_file_set_contents (path, (char *) img->data, img->len, &error);
      g_assert_no_error (error);
      g_free (path);
      g_free (name);
      name = g_strdup_printf ("%s-labels-idx1-ubyte", prefixes[s]);
      path = g_build_filename (root, name, NULL);
      g_file_set_contents (path, (char *) lab->data, lab->len, &error);
      g_assert_no_error (error);
      g_free (path);
      g_free (name);
      g_byte_array_free (img, TRUE);
      g_byte_array_free (lab, TRUE);
    }
  return root;
}

/* --train-count (and --test-count) above what the data holds was capped
 * without a word. */
static void
test_eval_counts_above_data (void)
{
  char *idx = write_idx_folder (12, 6);
  Run r;

  /* An IDX folder has its own test split: no --test-data needed. */
  r = run_eval (idx, NULL, "--train-count", "100");
  assert_one_line_error (&r, "--train-count 100: ");
  g_assert_nonnull (strstr (r.err, "holds 12 training images"));
  g_assert_cmpstr (r.out, ==, "");
  run_clear (&r);
  r = run_eval (idx, NULL, "--test-count", "7");
  assert_one_line_error (&r, "--test-count 7: ");
  g_assert_nonnull (strstr (r.err, "holds 6 test images"));
  run_clear (&r);
  r = run_eval (idx, NULL, "--guidance-scale", "-2");
  assert_one_line_error (&r, "eval: --guidance-scale: use 0..100");
  run_clear (&r);

  /* Exactly what there is works, and so does the default 10000 (all 12). */
  r = run_eval (idx, NULL, "--train-count", "12");
  assert_ok (&r);
  run_clear (&r);
  r = run_eval (idx, NULL, "--test-count", "6");
  assert_ok (&r);
  g_assert_nonnull (strstr (r.out, "(12 training images vs"));
  g_assert_nonnull (strstr (r.out, "vs 6 test images"));
  run_clear (&r);
  g_free (idx);
}

/* The floors take each class's share of training images, as the samples
 * do: a training set sorted by class gives the floors of one that takes
 * the classes in turn (every image of a class the same here, so both pick
 * the same images); the first 6 of the sorted set would all be blank. */
static void
test_eval_floor_balanced (void)
{
  char *turns = write_idx_ordered (12, 6, 1, "idx-turns");
  char *sorted = write_idx_ordered (12, 6, 2, "idx-sorted");
  Run a = run_eval (turns, NULL, "--train-count", "9");
  Run b = run_eval (sorted, NULL, "--train-count", "9");
  const char *fa, *fb;

  assert_ok (&a);
  assert_ok (&b);
  fa = strstr (a.out, "frechet floor");
  fb = strstr (b.out, "frechet floor");
  g_assert_nonnull (fa);
  g_assert_nonnull (fb);
  g_assert_nonnull (strstr (fa, "frechet floor at the sample count: "));
  g_test_message ("%s", fb);
  g_assert_cmpstr (fa, ==, fb);
  run_clear (&a);
  run_clear (&b);
  g_free (turns);
  g_free (sorted);
}

/* ---- eval: classes ---- */

/* The accuracy was counted against a classifier of other classes. */
static void
test_eval_classifier_classes (void)
{
  char *idx = write_idx_folder (12, 6);
  Run r;

  r = RUN (EVAL1, "--model", folder_model, "--classifier", fruit_classifier,
           "--data", idx, "--count", "6", "--steps", "1");
  assert_one_line_error (&r, "--classifier ");
  g_assert_nonnull (strstr (r.err, "has classes apple, banana, cherry; the "
                            "model "));
  g_assert_nonnull (strstr (r.err, "has blank, dots, stripes"));
  g_assert_cmpstr (r.out, ==, "");
  run_clear (&r);
  r = RUN (EVAL1, "--model", folder_model, "--classifier", pair_classifier,
           "--data", idx, "--count", "6", "--steps", "1");
  assert_one_line_error (&r, "has 2 classes (circle, square); the model ");
  run_clear (&r);
  g_free (idx);
}

/* A test folder of other class folders, or of one, was compared as if it
 * held the model's classes. */
static void
test_eval_test_data_classes (void)
{
  char *data = write_image_folder ();
  char *other = write_image_folder_named ("images-other", 2, 4);
  char *single = write_image_folder_named ("images-single", 2, 4);
  char *from = g_build_filename (other, "dots", NULL);
  char *to = g_build_filename (other, "spots", NULL);
  char *cmd = g_strdup_printf ("rm -rf '%s/blank' '%s/stripes'", single,
                               single);
  char *want;
  Run r;

  g_assert_cmpint (g_rename (from, to), ==, 0);
  g_assert_cmpint (system (cmd), ==, 0);

  /* No --quiet: one line means no sampling step ran. */
  r = RUN (EVAL1, "--model", folder_model, "--classifier", folder_classifier,
           "--data", data, "--test-data", other, "--count", "6", "--steps",
           "1");
  want = g_strdup_printf ("--test-data %s has classes blank, spots, stripes; "
                          "the model %s has blank, dots, stripes", other,
                          folder_model);
  assert_one_line_error (&r, want);
  g_assert_cmpstr (r.out, ==, "");
  g_free (want);
  run_clear (&r);

  r = run_eval (data, single, NULL, NULL);
  want = g_strdup_printf ("--test-data %s has 1 class (dots); the model %s "
                          "has 3 (blank, dots, stripes)", single,
                          folder_model);
  assert_one_line_error (&r, want);
  g_free (want);
  run_clear (&r);

  /* The training images of the floor too. */
  r = run_eval (other, data, NULL, NULL);
  assert_one_line_error (&r, "--data ");
  g_assert_nonnull (strstr (r.err, "has classes blank, spots, stripes"));
  run_clear (&r);
  g_free (cmd);
  g_free (from);
  g_free (to);
  g_free (single);
  g_free (other);
  g_free (data);
}

/* --count below the number of classes printed "2 stripes 0.00% of 0". */
static void
test_eval_count_below_classes (void)
{
  char *data = write_image_folder ();
  char *test = write_image_folder_named ("images-test", 2, 4);
  Run r;

  r = run_eval (data, test, "--count", "2");
  assert_one_line_error (&r, "--count 2 is fewer than the 3 classes of ");
  g_assert_nonnull (strstr (r.err, "give at least 3"));
  g_assert_cmpstr (r.out, ==, "");
  run_clear (&r);

  /* One a class is enough, and no row is "of 0". */
  r = run_eval (data, test, "--count", "3");
  assert_ok (&r);
  g_test_message ("%s", r.out);
  g_assert_nonnull (strstr (r.out, "samples: 3 over 3 classes"));
  g_assert_null (strstr (r.out, " of 0\n"));
  run_clear (&r);
  g_free (test);
  g_free (data);
}

int
main (int argc, char **argv)
{
  GError *error = NULL;
  int status;

  g_test_init (&argc, &argv, NULL);
  diffuse = g_getenv ("DIFFUSE");
  if (diffuse == NULL)
    {
      g_printerr ("test-cli: set DIFFUSE to the diffuse program\n");
      return 1;
    }

  /* Tiny models, written with the engine itself. */
  fixtures = g_dir_make_tmp ("test-cli-XXXXXX", &error);
  g_assert_no_error (error);
  gray_model = write_model ("gray.safetensors", 1, TRUE);
  rgb_model = write_model ("rgb.safetensors", 3, FALSE);
  truncated_model = write_truncated (gray_model);
  misshaped_model = write_misshaped (gray_model);
  missing_model = g_build_filename (fixtures, "no-such.safetensors", NULL);
  nouncond_model = write_model_full ("nouncond.safetensors", 1, TRUE, FALSE,
                                     FALSE);
  gray_classifier = write_model_full ("classifier.safetensors", 1, FALSE,
                                      FALSE, TRUE);
  {
    const char *fruit[] = { "apple", "banana", "cherry", NULL };
    const char *pair[] = { "circle", "square", NULL };
    const char *folders[] = { "blank", "dots", "stripes", NULL };
    const char *numbers[] = { "1", "2", "3", NULL };

    fruit_classifier = write_model_classes ("fruit.safetensors",
                                            gray_classifier, 3, fruit);
    pair_classifier = write_model_classes ("pair.safetensors",
                                           gray_classifier, 2, pair);
    unnamed_classifier = write_model_classes ("unnamed.safetensors",
                                              gray_classifier, 3, NULL);
    folder_model = write_model_classes ("folder.safetensors", gray_model, 3,
                                        folders);
    folder_classifier = write_model_classes ("folder-classifier.safetensors",
                                             gray_classifier, 3, folders);
    numeric_model = write_model_classes ("numeric.safetensors", gray_model,
                                         3, numbers);
  }

  g_test_add_func ("/engine/cli/usage", test_usage);
  g_test_add_func ("/engine/cli/no-command-fails", test_no_command);
  g_test_add_func ("/engine/cli/generate/files", test_generate_files);
  g_test_add_func ("/engine/cli/generate/rgb", test_generate_rgb);
  g_test_add_func ("/engine/cli/generate/same-seed-same-bytes",
                   test_generate_same_seed);
  g_test_add_func ("/engine/cli/generate/batch-and-threads-invariant",
                   test_generate_batch_invariant);
  g_test_add_func ("/engine/cli/generate/guidance-interval",
                   test_generate_guidance_interval);
  g_test_add_func ("/engine/cli/generate/class-name-or-index",
                   test_generate_class_name);
  g_test_add_func ("/engine/cli/generate/progress-lines",
                   test_generate_progress);
  g_test_add_func ("/engine/cli/generate/explicit-options-that-work",
                   test_generate_explicit_options);
  g_test_add_func ("/engine/cli/generate/no-leak-under-valgrind",
                   test_generate_no_leak);
  g_test_add_func ("/engine/cli/generate/classifier-classes-must-match",
                   test_generate_classifier_classes);
  g_test_add_func ("/engine/cli/generate/out-under-a-file-checked-first",
                   test_generate_out_under_a_file);
  g_test_add_func ("/engine/cli/generate/out-read-only-checked-first",
                   test_generate_out_read_only);
  g_test_add_func ("/engine/cli/generate/write-error-names-the-file",
                   test_generate_write_error_names_the_file);
  g_test_add_func ("/engine/cli/generate/wrote-message",
                   test_generate_wrote_message);
  g_test_add_func ("/engine/cli/generate/help-batch-zero-automatic",
                   test_generate_help_batch_zero);
  g_test_add_func ("/engine/cli/generate/numeric-class-names",
                   test_generate_numeric_class_names);
  g_test_add_func ("/engine/cli/interpolate/ends-are-the-seeds",
                   test_interpolate_ends);
  g_test_add_func ("/engine/cli/info", test_info);
  g_test_add_func ("/engine/cli/schedule/rows", test_schedule);
  g_test_add_func ("/engine/cli/schedule/bad-input", test_schedule_bad);
  g_test_add_func ("/engine/cli/schedule/timesteps-with-model",
                   test_schedule_timesteps_with_model);
  g_test_add_func ("/engine/cli/eps/round-trip", test_eps_round_trip);
  g_test_add_func ("/engine/cli/train/then-eval", test_train_and_eval);
  g_test_add_func ("/engine/cli/train/interrupted-keeps-work",
                   test_train_interrupted);
  g_test_add_func ("/engine/cli/train/bad-input", test_train_bad);
  g_test_add_func ("/engine/cli/train/config-classes",
                   test_train_config_classes);
  g_test_add_func ("/engine/cli/train/write-error-names-the-file",
                   test_train_write_error_names_the_file);
  g_test_add_func ("/engine/cli/train/output-files-checked-first",
                   test_train_output_checked_first);
  g_test_add_func ("/engine/cli/train/sizes-refused",
                   test_train_sizes_refused);
  g_test_add_func ("/engine/cli/train/attention-flags-0-or-1",
                   test_train_attention_flags);
  g_test_add_func ("/engine/cli/train/p-uncond-with-classifier",
                   test_train_p_uncond_classifier);
  g_test_add_func ("/engine/cli/train/empty-class-folder",
                   test_train_empty_class_folder);
  g_test_add_func ("/engine/cli/train/resume-nothing-to-train",
                   test_train_resume_nothing_to_train);
  g_test_add_func ("/engine/cli/train/resume-refuses-another-run",
                   test_train_resume_refuses_another_run);
  g_test_add_func ("/engine/cli/train/resume-reports-changes",
                   test_train_resume_reports_changes);
  g_test_add_func ("/engine/cli/train/resume-no-checkpoint-yet",
                   test_train_resume_no_checkpoint_yet);
  g_test_add_func ("/engine/cli/train/output-files-distinct",
                   test_train_outputs_distinct);
  g_test_add_func ("/engine/cli/train/too-big-refused-first",
                   test_train_too_big);
  g_test_add_func ("/engine/cli/train/checkpoint-minutes-and-weight-decay",
                   test_train_minutes_and_weight_decay);
  g_test_add_func ("/engine/cli/train/help-shows-defaults",
                   test_train_help_defaults);
  g_test_add_func ("/engine/cli/train/banner-one-class",
                   test_train_banner_one_class);
  g_test_add_func ("/engine/cli/eval/folder-needs-test-data",
                   test_eval_folder_needs_test_data);
  g_test_add_func ("/engine/cli/eval/floor-classes-balanced",
                   test_eval_floor_balanced);
  g_test_add_func ("/engine/cli/eval/counts-above-data",
                   test_eval_counts_above_data);
  g_test_add_func ("/engine/cli/eval/classifier-classes-must-match",
                   test_eval_classifier_classes);
  g_test_add_func ("/engine/cli/eval/test-data-classes-must-match",
                   test_eval_test_data_classes);
  g_test_add_func ("/engine/cli/eval/count-below-classes",
                   test_eval_count_below_classes);
  g_test_add_func ("/engine/cli/eps/bad-magic", test_eps_bad_magic);
  g_test_add_func ("/engine/cli/eps/output-names-the-file",
                   test_eps_output_names_the_file);
  for (gsize i = 0; i < G_N_ELEMENTS (bad_npys); i++)
    {
      char *path = g_strdup_printf ("/engine/cli/eps/bad-%s", bad_npys[i].name);
      g_test_add_data_func (path, &bad_npys[i], test_eps_bad);
      g_free (path);
    }
  g_test_add_func ("/engine/cli/bad-input/out-empty", test_out_empty);
  for (gsize i = 0; i < G_N_ELEMENTS (bad_cases); i++)
    {
      char *path = g_strdup_printf ("/engine/cli/bad-input/%s",
                                    bad_cases[i].name);
      g_test_add_data_func (path, &bad_cases[i], test_bad_input);
      g_free (path);
    }
  status = g_test_run ();

  {
    char *cmd = g_strdup_printf ("rm -rf '%s'", fixtures);
    if (system (cmd) != 0)
      g_printerr ("test-cli: could not remove %s\n", fixtures);
    g_free (cmd);
  }
  return status;
}
