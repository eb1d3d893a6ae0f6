/* test-plugin-gimp.c: the plug-in end to end in the real gimp-console-2.10.
 *
 * One gimp-console run (it costs seconds to start) in a fresh
 * GIMP2_DIRECTORY with the built plug-in linked into its plug-ins folder
 * and DIFFUSE_WEIGHTS pointing at tiny models written here.  A Script-Fu
 * file calls the three procedures non-interactively and writes what it
 * sees, one "TAG<tab>key<tab>value" line each, to a results file; every
 * test case below checks one behaviour in those results.
 */
#include <errno.h>
#include <glib/gstdio.h>
#include <math.h>
#include <stdlib.h>
#include <unistd.h>
#include <gdk-pixbuf/gdk-pixbuf.h>
#include <json-glib/json-glib.h>
#include <string.h>

#include "model.h"
#include "plugin-fixture.h"

static char      *tmpdir;
static char      *weights;
static GPtrArray *results;     /* of char ** {tag, key, value} */
static char      *gimp_log;
static gboolean   gimp_ran;

/* ---- the Script-Fu program ---- */

static const char script_head[] =
  "(define out-port (open-output-file \"%s/results.txt\"))\n"
  "(define (emit . xs)\n"
  "  (for-each (lambda (x) (display x out-port)) xs)\n"
  "  (newline out-port))\n"
  "(define last-error \"\")\n"
  "(set! *error-hook* (lambda xs (set! last-error xs) (throw)))\n"
  "(define (try thunk) (set! last-error \"\") (catch #f (thunk)))\n"
  "(define (new-image w h type layer-type)\n"
  "  (let* ((img (car (gimp-image-new w h type)))\n"
  "         (bg (car (gimp-layer-new img w h layer-type \"bg\" 100 0))))\n"
  "    (gimp-image-insert-layer img bg 0 0)\n"
  "    (list img bg)))\n"
  "(define (n-layers img) (car (gimp-image-get-layers img)))\n"
  "(define (emit-layers tag img ret)\n"
  "  (emit tag \"\\tn\\t\" (car ret))\n"
  "  (emit tag \"\\timage-layers\\t\" (n-layers img))\n"
  "  (let loop ((i 0))\n"
  "    (if (< i (car ret))\n"
  "      (let ((id (vector-ref (cadr ret) i)))\n"
  "        (emit tag \"\\tname\\t\" (car (gimp-item-get-name id)))\n"
  "        (emit tag \"\\tsize\\t\" (car (gimp-drawable-width id)) \"x\"\n"
  "              (car (gimp-drawable-height id)))\n"
  "        (emit tag \"\\talpha\\t\" (car (gimp-drawable-has-alpha id)))\n"
  "        (emit tag \"\\tflags\\t\"\n"
  "              (cadr (car (gimp-item-get-parasite id \"diffusion-params\"))))\n"
  "        (emit tag \"\\tparasite\\t\"\n"
  "              (caddr (car (gimp-item-get-parasite id \"diffusion-params\"))))\n"
  "        (loop (+ i 1))))))\n"
  "(define (save img id name)\n"
  "  (let ((f (string-append \"%s/\" name \".png\")))\n"
  "    (file-png-save-defaults RUN-NONINTERACTIVE img id f f)))\n"
  /* A bad call: its error and the layer count after it. */
  "(define (bad tag thunk)\n"
  "  (let* ((a (new-image 32 32 RGB RGB-IMAGE)) (img (car a)))\n"
  "    (emit tag \"\\tresult\\t\" (if (try (lambda () (thunk img (cadr a))))\n"
  "                                 \"ok\" \"failed\"))\n"
  "    (emit tag \"\\terror\\t\" last-error)\n"
  "    (emit tag \"\\timage-layers\\t\" (n-layers img))))\n";

/* Each case is its own form so one failure cannot hide the others. */
static const char script_body[] =
  /* A: Generate, 2 samples on an RGB image. */
  "(let* ((a (new-image 64 48 RGB RGB-IMAGE)) (img (car a)))\n"
  "  (emit-layers \"gen\" img (plug-in-diffusion-generate RUN-NONINTERACTIVE\n"
  "                 img (cadr a) \"\" 2 5 0.0 7 0)))\n"
  /* Last values, on a new image (GIMP renames duplicate layer names). */
  "(let* ((a (new-image 64 48 RGB RGB-IMAGE)) (img (car a)))\n"
  "  (emit-layers \"last\" img (plug-in-diffusion-generate RUN-WITH-LAST-VALS\n"
  "                 img (cadr a) \"\" 0 0 0.0 0 0)))\n"
  /* B: at the model's size on a gray image, to compare with the engine. */
  "(let* ((a (new-image 16 16 GRAY GRAY-IMAGE)) (img (car a))\n"
  "       (r (plug-in-diffusion-generate RUN-NONINTERACTIVE img (cadr a)\n"
  "            \"\" 1 5 0.5 11 0)))\n"
  "  (emit-layers \"gray\" img r)\n"
  "  (save img (vector-ref (cadr r) 0) \"gray\"))\n"
  /* C: Interpolate, and Generate with each end seed on the same size. */
  "(let* ((a (new-image 40 40 RGB RGB-IMAGE)) (img (car a))\n"
  "       (r (plug-in-diffusion-interpolate RUN-NONINTERACTIVE img (cadr a)\n"
  "            \"\" 7 9 4 5 -1)))\n"
  "  (emit-layers \"interp\" img r)\n"
  "  (save img (vector-ref (cadr r) 0) \"frame-first\")\n"
  "  (save img (vector-ref (cadr r) 3) \"frame-last\"))\n"
  "(let* ((a (new-image 40 40 RGB RGB-IMAGE)) (img (car a))\n"
  "       (r (plug-in-diffusion-generate RUN-NONINTERACTIVE img (cadr a)\n"
  "            \"\" 1 5 0.0 7 0)))\n"
  "  (save img (vector-ref (cadr r) 0) \"gen-seed-a\"))\n"
  "(let* ((a (new-image 40 40 RGB RGB-IMAGE)) (img (car a))\n"
  "       (r (plug-in-diffusion-generate RUN-NONINTERACTIVE img (cadr a)\n"
  "            \"\" 1 5 0.0 9 0)))\n"
  "  (save img (vector-ref (cadr r) 0) \"gen-seed-b\"))\n"
  /* C2: Interpolate towards class 2 guides as Class-guided does (free,
   * scale 3, the default interval): its first frame is Class-guided's
   * image of seed a. */
  "(let* ((a (new-image 24 24 RGB RGB-IMAGE)) (img (car a))\n"
  "       (r (plug-in-diffusion-interpolate RUN-NONINTERACTIVE img (cadr a)\n"
  "            \"\" 7 9 3 5 2)))\n"
  "  (emit-layers \"interp-class\" img r)\n"
  "  (save img (vector-ref (cadr r) 0) \"frame-class-first\"))\n"
  "(let* ((a (new-image 24 24 RGB RGB-IMAGE)) (img (car a))\n"
  "       (r (plug-in-diffusion-class-guided RUN-NONINTERACTIVE img (cadr a)\n"
  "            \"\" 2 1 5 0.0 7 0 3.0 \"\")))\n"
  "  (save img (vector-ref (cadr r) 0) \"guided-seed-a\"))\n"
  /* C3: at one step (sigma 0.01) nothing is in the interval: conditional
   * frames, recorded as unguided. */
  "(let* ((a (new-image 24 24 RGB RGB-IMAGE)) (img (car a)))\n"
  "  (emit-layers \"interp-class-1step\" img\n"
  "    (plug-in-diffusion-interpolate RUN-NONINTERACTIVE img (cadr a)\n"
  "       \"\" 7 9 2 1 2)))\n"
  /* D: Class-guided, classifier-free, on a layer with alpha. */
  "(let* ((a (new-image 24 24 RGB RGBA-IMAGE)) (img (car a)))\n"
  "  (emit-layers \"cfg\" img (plug-in-diffusion-class-guided\n"
  "                 RUN-NONINTERACTIVE img (cadr a) \"\" 2 2 5 0.0 3 0 2.0\n"
  "                 \"\")))\n"
  /* E: Class-guided with the shipped classifier. */
  "(let* ((a (new-image 24 24 RGB RGB-IMAGE)) (img (car a)))\n"
  "  (emit-layers \"clf\" img (plug-in-diffusion-class-guided\n"
  "                 RUN-NONINTERACTIVE img (cadr a) \"\" 1 1 4 0.0 5 1 1.5\n"
  "                 \"\")))\n"
  /* F: bad arguments. */
  "(bad \"steps0\" (lambda (img d) (plug-in-diffusion-generate\n"
  "   RUN-NONINTERACTIVE img d \"\" 1 0 0.0 1 0)))\n"
  "(bad \"eta-1\" (lambda (img d) (plug-in-diffusion-generate\n"
  "   RUN-NONINTERACTIVE img d \"\" 1 5 -1.0 1 0)))\n"
  "(bad \"count0\" (lambda (img d) (plug-in-diffusion-generate\n"
  "   RUN-NONINTERACTIVE img d \"\" 0 5 0.0 1 0)))\n"
  "(bad \"class99\" (lambda (img d) (plug-in-diffusion-class-guided\n"
  "   RUN-NONINTERACTIVE img d \"\" 99 1 5 0.0 1 0 2.0 \"\")))\n"
  "(bad \"guided-no-step\" (lambda (img d) (plug-in-diffusion-class-guided\n"
  "   RUN-NONINTERACTIVE img d \"\" 2 1 1 0.0 1 0 2.0 \"\")))\n"
  "(bad \"missing\" (lambda (img d) (plug-in-diffusion-generate\n"
  "   RUN-NONINTERACTIVE img d \"%s/missing.safetensors\" 1 5 0.0 1 0)))\n"
  "(bad \"corrupt\" (lambda (img d) (plug-in-diffusion-generate\n"
  "   RUN-NONINTERACTIVE img d \"%s/corrupt.safetensors\" 1 5 0.0 1 0)))\n"
  "(bad \"classifier-classes\" (lambda (img d) (plug-in-diffusion-class-guided\n"
  "   RUN-NONINTERACTIVE img d \"\" 1 1 4 0.0 5 1 1.5\n"
  "   \"%s/other-classifier.safetensors\")))\n"
  "(bad \"steps-over-T\" (lambda (img d) (plug-in-diffusion-interpolate\n"
  "   RUN-NONINTERACTIVE img d \"\" 1 2 3 101 -1)))\n"
  "(emit \"end\\tok\\t1\")\n"
  "(close-output-port out-port)\n";

static gboolean
run_gimp (GError **error)
{
  char *gimpdir = g_build_filename (tmpdir, "gimp", NULL);
  char *plugdir = g_build_filename (gimpdir, "plug-ins", "diffuse", NULL);
  char *link = g_build_filename (plugdir, "diffuse", NULL);
  char *script_path = g_build_filename (tmpdir, "test.scm", NULL);
  char *results_path = g_build_filename (tmpdir, "results.txt", NULL);
  const char *plugin = g_getenv ("DIFFUSE_PLUGIN");
  char *script, *load, *out = NULL, *err = NULL, *text = NULL;
  char **env, **lines;
  int status;
  gboolean ok = FALSE;

  if (plugin == NULL)
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_FAILED,
                           "DIFFUSE_PLUGIN is not set (meson sets it)");
      goto out;
    }
  g_mkdir_with_parents (plugdir, 0755);
  if (symlink (plugin, link) != 0)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_FAILED, "symlink %s: %s",
                   link, g_strerror (errno));
      goto out;
    }

  script = g_strdup_printf ("%s%s", script_head, script_body);
  {
    /* Five %s: results dir, PNG dir, missing, corrupt and other-classes
     * model dirs. */
    char *filled = g_strdup_printf (script, tmpdir, tmpdir, tmpdir, tmpdir,
                                    tmpdir);

    g_free (script);
    script = filled;
  }
  if (!g_file_set_contents (script_path, script, -1, error))
    goto out;
  {
    /* Not a safetensors file: the engine's error must reach the caller. */
    char *corrupt = g_build_filename (tmpdir, "corrupt.safetensors", NULL);

    char *other = g_build_filename (tmpdir, "other-classifier.safetensors",
                                    NULL);

    ok = g_file_set_contents (corrupt, "not a model", -1, error)
         && fixture_write_other_classifier (other, error);
    g_free (corrupt);
    g_free (other);
    if (!ok)
      goto out;
  }
  g_free (script);

  env = g_get_environ ();
  env = g_environ_setenv (env, "GIMP2_DIRECTORY", gimpdir, TRUE);
  env = g_environ_setenv (env, "DIFFUSE_WEIGHTS", weights, TRUE);
  load = g_strdup_printf ("(load \"%s\")", script_path);
  {
    const char *argv[] = { "gimp-console-2.10", "-i", "-d", "-f",
                           "-b", load, "-b", "(gimp-quit 0)", NULL };

    ok = g_spawn_sync (tmpdir, (char **) argv, env, G_SPAWN_SEARCH_PATH,
                       NULL, NULL, &out, &err, &status, error);
  }
  g_strfreev (env);
  g_free (load);
  if (!ok)
    goto out;
  gimp_log = g_strdup_printf ("stdout:\n%s\nstderr:\n%s", out, err);

  ok = g_file_get_contents (results_path, &text, NULL, error);
  if (!ok)
    goto out;
  lines = g_strsplit (text, "\n", -1);
  for (char **l = lines; *l != NULL; l++)
    if (**l != '\0')
      g_ptr_array_add (results, g_strsplit (*l, "\t", 3));
  g_strfreev (lines);

out:
  g_free (out);
  g_free (err);
  g_free (text);
  g_free (gimpdir);
  g_free (plugdir);
  g_free (link);
  g_free (script_path);
  g_free (results_path);
  return ok;
}

/* ---- looking things up ---- */

static void
require_gimp (void)
{
  if (!gimp_ran)
    {
      g_test_message ("gimp-console log:\n%s", gimp_log ? gimp_log : "-");
      g_test_fail_printf ("gimp-console did not run the script");
    }
}

/* The nth value of (tag, key), or NULL. */
static const char *
lookup (const char *tag, const char *key, int nth)
{
  for (guint i = 0; i < results->len; i++)
    {
      char **f = results->pdata[i];

      if (g_strv_length (f) == 3 && strcmp (f[0], tag) == 0
          && strcmp (f[1], key) == 0 && nth-- == 0)
        return f[2];
    }
  return NULL;
}

static JsonObject *
parasite_json (const char *tag, int nth, JsonParser *parser)
{
  const char *text = lookup (tag, "parasite", nth);
  GError *error = NULL;

  g_assert_nonnull (text);
  json_parser_load_from_data (parser, text, -1, &error);
  g_assert_no_error (error);
  return json_node_get_object (json_parser_get_root (parser));
}

static void
assert_layers (const char *tag, int n, int before, const char *size)
{
  require_gimp ();
  if (g_test_failed ())
    return;
  g_assert_cmpint (atoi (lookup (tag, "n", 0) ? lookup (tag, "n", 0) : "-1"),
                   ==, n);
  g_assert_cmpint (atoi (lookup (tag, "image-layers", 0)), ==, before + n);
  for (int i = 0; i < n; i++)
    {
      g_assert_cmpstr (lookup (tag, "size", i), ==, size);
      /* Persistent | undoable. */
      g_assert_cmpstr (lookup (tag, "flags", i), ==, "3");
    }
}

/* Compares two PNGs byte for byte; returns the number of differing bytes. */
static int
png_diff (const char *a, const char *b, int *max_diff)
{
  char *pa = g_strdup_printf ("%s/%s.png", tmpdir, a);
  char *pb = g_strdup_printf ("%s/%s.png", tmpdir, b);
  GError *error = NULL;
  GdkPixbuf *ia = gdk_pixbuf_new_from_file (pa, &error);
  GdkPixbuf *ib;
  int n = 0, w, h, ch, sa, sb;

  g_assert_no_error (error);
  ib = gdk_pixbuf_new_from_file (pb, &error);
  g_assert_no_error (error);
  w = gdk_pixbuf_get_width (ia);
  h = gdk_pixbuf_get_height (ia);
  ch = gdk_pixbuf_get_n_channels (ia);
  g_assert_cmpint (w, ==, gdk_pixbuf_get_width (ib));
  g_assert_cmpint (h, ==, gdk_pixbuf_get_height (ib));
  g_assert_cmpint (ch, ==, gdk_pixbuf_get_n_channels (ib));
  sa = gdk_pixbuf_get_rowstride (ia);
  sb = gdk_pixbuf_get_rowstride (ib);
  *max_diff = 0;
  for (int y = 0; y < h; y++)
    for (int x = 0; x < w * ch; x++)
      {
        int d = abs (gdk_pixbuf_get_pixels (ia)[y * sa + x]
                     - gdk_pixbuf_get_pixels (ib)[y * sb + x]);

        n += d != 0;
        *max_diff = MAX (*max_diff, d);
      }
  g_object_unref (ia);
  g_object_unref (ib);
  g_free (pa);
  g_free (pb);
  return n;
}

/* ---- tests ---- */

static void
test_generate_layers (void)
{
  JsonParser *parser = json_parser_new ();
  JsonObject *o;

  assert_layers ("gen", 2, 1, "64x48");
  if (g_test_failed ())
    return;
  g_assert_cmpstr (lookup ("gen", "name", 0), ==,
                   "Diffusion: seed 7 #1, DDIM 5, eta 0.0");
  g_assert_cmpstr (lookup ("gen", "name", 1), ==,
                   "Diffusion: seed 7 #2, DDIM 5, eta 0.0");
  g_assert_cmpstr (lookup ("gen", "alpha", 0), ==, "0");

  o = parasite_json ("gen", 1, parser);
  g_assert_cmpstr (json_object_get_string_member (o, "procedure"), ==,
                   "plug-in-diffusion-generate");
  g_assert_cmpint (json_object_get_int_member (o, "seed"), ==, 7);
  g_assert_cmpint (json_object_get_int_member (o, "index"), ==, 1);
  g_assert_cmpint (json_object_get_int_member (o, "steps"), ==, 5);
  g_assert_cmpstr (json_object_get_string_member (o, "sampler"), ==, "ddim");
  g_assert_true (g_str_has_suffix (json_object_get_string_member (o, "model"),
                                   "/fashion-mnist.safetensors"));
  g_object_unref (parser);
}

static void
test_generate_last_values (void)
{
  /* The last-values call had zeros for every argument: it must reuse the
   * previous call's settings (2 samples, seed 7, 5 steps). */
  assert_layers ("last", 2, 1, "64x48");
  if (g_test_failed ())
    return;
  g_assert_cmpstr (lookup ("last", "name", 0), ==,
                   "Diffusion: seed 7 #1, DDIM 5, eta 0.0");
}

static void
test_generate_matches_engine (void)
{
  char *path = g_build_filename (weights, "fashion-mnist.safetensors", NULL);
  char *png = g_build_filename (tmpdir, "gray.png", NULL);
  GError *error = NULL;
  DfModel *m;
  DfSampleParams sp;
  float out[FIXTURE_SIZE * FIXTURE_SIZE];       /* [1,1,H,W] */
  GdkPixbuf *pb;
  int worst = 0, n_diff = 0;

  assert_layers ("gray", 1, 1, "16x16");
  if (g_test_failed ())
    return;
  g_assert_cmpstr (lookup ("gray", "name", 0), ==,
                   "Diffusion: seed 11, DDIM 5, eta 0.5");

  /* The same job straight through the engine ("no class" = class 3). */
  m = df_model_load (path, &error);
  g_assert_no_error (error);
  df_sample_params_init (&sp);
  sp.steps = 5;
  sp.eta = 0.5;
  sp.seed = 11;
  sp.label = df_model_uncond_class (m);
  g_assert_true (df_model_generate (m, NULL, &sp, 1, 1, out, NULL, NULL,
                                    NULL, &error));
  g_assert_no_error (error);

  pb = gdk_pixbuf_new_from_file (png, &error);
  g_assert_no_error (error);
  g_assert_cmpint (gdk_pixbuf_get_width (pb), ==, FIXTURE_SIZE);
  for (int y = 0; y < FIXTURE_SIZE; y++)
    for (int x = 0; x < FIXTURE_SIZE; x++)
      {
        float v = (out[y * FIXTURE_SIZE + x] + 1.0f) * 0.5f * 255.0f;
        int want = (int) CLAMP (lrintf (v), 0, 255);
        int got = gdk_pixbuf_get_pixels (pb)[y * gdk_pixbuf_get_rowstride (pb)
                                             + x * gdk_pixbuf_get_n_channels (pb)];

        worst = MAX (worst, abs (want - got));
        n_diff += want != got;
      }
  g_test_message ("layer vs engine: %d of %d pixels differ, worst %d/255",
                  n_diff, FIXTURE_SIZE * FIXTURE_SIZE, worst);
  g_assert_cmpint (worst, ==, 0);

  g_object_unref (pb);
  df_model_free (m);
  g_free (path);
  g_free (png);
}

static void
test_interpolate_layers (void)
{
  JsonParser *parser = json_parser_new ();
  JsonObject *o;

  assert_layers ("interp", 4, 1, "40x40");
  if (g_test_failed ())
    return;
  g_assert_cmpstr (lookup ("interp", "name", 0), ==,
                   "Diffusion: seeds 7-9 frame 1/4, DDIM 5 (100ms)");
  for (int i = 0; i < 4; i++)
    g_assert_true (g_str_has_suffix (lookup ("interp", "name", i),
                                     " (100ms)"));
  o = parasite_json ("interp", 3, parser);
  g_assert_cmpint (json_object_get_int_member (o, "seed_a"), ==, 7);
  g_assert_cmpint (json_object_get_int_member (o, "seed_b"), ==, 9);
  g_assert_cmpint (json_object_get_int_member (o, "frame"), ==, 3);
  g_object_unref (parser);
}

/* A parasite's guidance interval is the front ends' default. */
static void
assert_default_interval (JsonObject *o)
{
  JsonArray *iv = json_object_get_array_member (o, "guidance_interval");

  g_assert_cmpint (json_array_get_length (iv), ==, 2);
  g_assert_cmpfloat (json_array_get_double_element (iv, 0), ==,
                     DF_FREE_GUIDE_LO);
  g_assert_cmpfloat (json_array_get_double_element (iv, 1), ==,
                     DF_FREE_GUIDE_HI);
}

/* The frames record the guidance they were made with. */
static void
test_interpolate_class_parasite (void)
{
  JsonParser *parser = json_parser_new ();
  JsonObject *o;

  assert_layers ("interp-class", 3, 1, "24x24");
  if (g_test_failed ())
    return;
  o = parasite_json ("interp-class", 1, parser);
  g_assert_cmpint (json_object_get_int_member (o, "class"), ==, 2);
  g_assert_cmpstr (json_object_get_string_member (o, "guidance"), ==, "free");
  g_assert_cmpfloat (json_object_get_double_member (o, "scale"), ==, 3.0);
  assert_default_interval (o);
  g_object_unref (parser);

  /* Without a class there is nothing to guide towards, and at one step
   * no step to guide. */
  parser = json_parser_new ();
  o = parasite_json ("interp", 0, parser);
  g_assert_false (json_object_has_member (o, "guidance"));
  g_object_unref (parser);
  parser = json_parser_new ();
  o = parasite_json ("interp-class-1step", 0, parser);
  g_assert_cmpint (json_object_get_int_member (o, "class"), ==, 2);
  g_assert_false (json_object_has_member (o, "guidance"));
  g_object_unref (parser);
}

static void
test_interpolate_ends (gconstpointer data)
{
  const char *const *pair = data;
  int worst, n;

  require_gimp ();
  if (g_test_failed ())
    return;
  n = png_diff (pair[0], pair[1], &worst);
  g_test_message ("%s vs %s: %d bytes differ, worst %d/255", pair[0],
                  pair[1], n, worst);
  g_assert_cmpint (n, ==, 0);
}

static void
test_class_guided_layers (void)
{
  JsonParser *parser = json_parser_new ();
  JsonObject *o;

  assert_layers ("cfg", 2, 1, "24x24");
  if (g_test_failed ())
    return;
  g_assert_cmpstr (lookup ("cfg", "name", 0), ==,
                   "Diffusion: Sneaker, seed 3 #1, DDIM 5, eta 0.0, "
                   "guidance 2.0");
  /* The active layer has alpha, so the new ones do. */
  g_assert_cmpstr (lookup ("cfg", "alpha", 0), ==, "1");
  o = parasite_json ("cfg", 0, parser);
  g_assert_cmpint (json_object_get_int_member (o, "class"), ==, 2);
  g_assert_cmpstr (json_object_get_string_member (o, "class_name"), ==,
                   "Sneaker");
  g_assert_cmpstr (json_object_get_string_member (o, "guidance"), ==, "free");
  g_assert_cmpfloat (json_object_get_double_member (o, "scale"), ==, 2.0);
  assert_default_interval (o);
  g_object_unref (parser);
}

static void
test_class_guided_classifier (void)
{
  JsonParser *parser = json_parser_new ();
  JsonObject *o;

  assert_layers ("clf", 1, 1, "24x24");
  if (g_test_failed ())
    return;
  g_assert_cmpstr (lookup ("clf", "name", 0), ==,
                   "Diffusion: Trouser, seed 5, DDIM 4, eta 0.0, "
                   "classifier guidance 1.5");
  o = parasite_json ("clf", 0, parser);
  g_assert_true (g_str_has_suffix (
      json_object_get_string_member (o, "classifier"),
      "/fashion-mnist-classifier.safetensors"));
  g_object_unref (parser);
}

/* data: {case tag, a word the error message must contain}. */
static void
test_bad_argument (gconstpointer data)
{
  const char *const *c = data;
  const char *msg;

  require_gimp ();
  if (g_test_failed ())
    return;
  msg = lookup (c[0], "error", 0);
  g_test_message ("%s: %s", c[0], msg ? msg : "(none)");
  g_assert_cmpstr (lookup (c[0], "result", 0), ==, "failed");
  g_assert_nonnull (strstr (msg, c[1]));
  g_assert_cmpstr (lookup (c[0], "image-layers", 0), ==, "1");
}

int
main (int argc, char **argv)
{
  static const char *const first[] = { "frame-first", "gen-seed-a" };
  static const char *const last[] = { "frame-last", "gen-seed-b" };
  static const char *const class_first[] = { "frame-class-first",
                                             "guided-seed-a" };
  static const char *const bad[][2] = {
    { "steps0", "steps 0 is out of range" },
    { "eta-1", "eta -1 is out of range" },
    { "count0", "count 0 is out of range" },
    { "class99", "class 99 is out of range" },
    /* One step (sigma 0.01) is outside the default interval. */
    { "guided-no-step", "guidance scale 2 has no effect at 1 step:" },
    { "missing", "does not exist" },
    /* An execution error ("failed:", not "failed on invalid input"). */
    { "corrupt", "failed: cannot load model" },
    { "steps-over-T", "more than the 100 timesteps" },
    { "classifier-classes", "has classes apple, banana, cherry" },
  };
  GError *error = NULL;
  int rc;

  g_test_init (&argc, &argv, NULL);

  results = g_ptr_array_new_with_free_func ((GDestroyNotify) g_strfreev);
  tmpdir = g_dir_make_tmp ("diffuse-gimp-XXXXXX", &error);
  g_assert_no_error (error);
  weights = g_build_filename (tmpdir, "weights", NULL);
  g_mkdir (weights, 0755);
  if (!fixture_write_models (weights, &error))
    g_error ("cannot write the test models: %s", error->message);

  gimp_ran = run_gimp (&error) && lookup ("end", "ok", 0) != NULL;
  if (error != NULL)
    g_printerr ("# gimp-console: %s\n", error->message);
  g_clear_error (&error);

  g_test_add_func ("/plugin/gimp/generate/layers", test_generate_layers);
  g_test_add_func ("/plugin/gimp/generate/last-values",
                   test_generate_last_values);
  g_test_add_func ("/plugin/gimp/generate/matches-engine",
                   test_generate_matches_engine);
  g_test_add_func ("/plugin/gimp/interpolate/layers",
                   test_interpolate_layers);
  g_test_add_data_func ("/plugin/gimp/interpolate/first-frame-is-seed-a",
                        first, test_interpolate_ends);
  g_test_add_data_func ("/plugin/gimp/interpolate/last-frame-is-seed-b",
                        last, test_interpolate_ends);
  g_test_add_data_func ("/plugin/gimp/interpolate/class-is-guided",
                        class_first, test_interpolate_ends);
  g_test_add_func ("/plugin/gimp/interpolate/class-parasite",
                   test_interpolate_class_parasite);
  g_test_add_func ("/plugin/gimp/class-guided/layers",
                   test_class_guided_layers);
  g_test_add_func ("/plugin/gimp/class-guided/classifier",
                   test_class_guided_classifier);
  for (guint i = 0; i < G_N_ELEMENTS (bad); i++)
    {
      char *path = g_strdup_printf ("/plugin/gimp/errors/%s", bad[i][0]);

      g_test_add_data_func (path, bad[i], test_bad_argument);
      g_free (path);
    }

  rc = g_test_run ();

  if (rc == 0 && g_getenv ("DIFFUSE_KEEP_TMP") == NULL)
    {
      char *argv_rm[] = { "rm", "-rf", tmpdir, NULL };

      g_spawn_sync (NULL, argv_rm, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL,
                    NULL, NULL, NULL, NULL);
    }
  else
    g_printerr ("# kept %s\n", tmpdir);
  return rc;
}
