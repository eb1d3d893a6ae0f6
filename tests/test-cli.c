/* test-cli.c: the `diffuse` program end to end ($DIFFUSE), on tiny models
 * this test writes with the engine: files, sizes, channels, determinism,
 * batch invariance, interpolation ends, info, schedule, eps round trip, and
 * every bad input ending with status 1, one line and no file.
 */
#include <gdk-pixbuf/gdk-pixbuf.h>
#include <glib/gstdio.h>
#include <math.h>
#include <string.h>
#include <sys/wait.h>

#include "blas.h"
#include "model.h"
#include "safetensors.h"
#include "unet.h"

static const char *diffuse;
static char *fixtures;      /* temporary folder of model files */
static char *gray_model;    /* 1 x 8 x 8, circle/square/cross + uncond */
static char *rgb_model;     /* 3 x 8 x 8, unconditional */
static char *truncated_model, *misshaped_model, *missing_model;
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

/* ---- fixtures ---- */

static char *
write_model (const char *name, int channels, gboolean conditional)
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
  cfg.num_class_embeds = conditional ? 4 : 0;

  s = df_schedule_new (DF_BETA_LINEAR, 1000, 0, 0, &error);
  g_assert_no_error (error);
  m = df_model_new (&cfg, FALSE, s, conditional ? names : NULL,
                    conditional ? 3 : -1, &error);
  g_assert_no_error (error);
  df_unet_init (df_model_net (m), 1);
  if (conditional)
    gray_params = df_unet_param_count (df_model_net (m));
  df_model_save (m, path, &error);
  g_assert_no_error (error);
  df_model_free (m);
  df_schedule_free (s);
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

  r = run_argv ((const char *const[]) { NULL });
  assert_ok (&r);
  g_assert_nonnull (strstr (r.out, "interpolate"));
  run_clear (&r);

  for (gsize i = 0; i < G_N_ELEMENTS (cmds); i++)
    {
      r = RUN (cmds[i], "--help");
      assert_ok (&r);
      g_assert_nonnull (strstr (r.out, "--"));
      run_clear (&r);
    }
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
          double ab;

          if (lines[i][0] == '#' || lines[i][0] == 0)
            continue;
          g_assert_cmpint (sscanf (lines[i], "%d %d %lf", &index, &t, &ab),
                           ==, 3);
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

static char *
write_image_folder (void)
{
  const char *classes[] = { "dots", "stripes", "blank" };
  char *root = new_dir ("images");
  GError *error = NULL;

  for (int c = 0; c < 3; c++)
    {
      char *sub = g_build_filename (root, classes[c], NULL);
      g_assert_cmpint (g_mkdir_with_parents (sub, 0755), ==, 0);
      for (int k = 0; k < 4; k++)
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

static void
test_train_and_eval (void)
{
  char *data = write_image_folder ();
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

  r = RUN (EVAL1, "--model", unet, "--classifier", cls, "--data", data,
           "--count", "6", "--steps", "3", "--train-count", "12", "--quiet");
  assert_ok (&r);
  g_test_message ("%s", r.out);
  g_assert_nonnull (strstr (r.out, "accuracy: "));
  g_assert_nonnull (strstr (r.out, "of 6 asked classes"));
  g_assert_nonnull (strstr (r.out, "frechet distance: "));
  g_assert_nonnull (strstr (r.out, "frechet floor: "));
  run_clear (&r);

  g_free (data);
  g_free (dir);
  g_free (unet);
  g_free (cls);
  g_free (csv);
  g_free (plot);
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
  run_clear (&r);
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

  g_test_add_func ("/engine/cli/usage", test_usage);
  g_test_add_func ("/engine/cli/generate/files", test_generate_files);
  g_test_add_func ("/engine/cli/generate/rgb", test_generate_rgb);
  g_test_add_func ("/engine/cli/generate/same-seed-same-bytes",
                   test_generate_same_seed);
  g_test_add_func ("/engine/cli/generate/batch-and-threads-invariant",
                   test_generate_batch_invariant);
  g_test_add_func ("/engine/cli/generate/class-name-or-index",
                   test_generate_class_name);
  g_test_add_func ("/engine/cli/generate/progress-lines",
                   test_generate_progress);
  g_test_add_func ("/engine/cli/interpolate/ends-are-the-seeds",
                   test_interpolate_ends);
  g_test_add_func ("/engine/cli/info", test_info);
  g_test_add_func ("/engine/cli/schedule/rows", test_schedule);
  g_test_add_func ("/engine/cli/schedule/bad-input", test_schedule_bad);
  g_test_add_func ("/engine/cli/eps/round-trip", test_eps_round_trip);
  g_test_add_func ("/engine/cli/train/then-eval", test_train_and_eval);
  g_test_add_func ("/engine/cli/train/bad-input", test_train_bad);
  g_test_add_func ("/engine/cli/eps/bad-magic", test_eps_bad_magic);
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
