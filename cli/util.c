/* util.c: errors, option parsing, weights look-up, PNG encoding, all-or-
 * nothing output, progress and cancellation for the `diffuse` commands.
 */
#include "cli.h"

#include <cairo.h>
#include <errno.h>
#include <gdk-pixbuf/gdk-pixbuf.h>
#include <glib/gstdio.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

G_DEFINE_QUARK (diffuse-cli-error-quark, cli_error)

/* ---- errors ---- */

int
cli_failf (const char *format, ...)
{
  va_list args;
  char *msg;

  va_start (args, format);
  msg = g_strdup_vprintf (format, args);
  va_end (args);

  /* One line whatever the engine wrote, so scripts can rely on it. */
  g_strdelimit (msg, "\r\n", ' ');
  g_strstrip (msg);
  fprintf (stderr, "diffuse: %s\n", msg);
  fflush (stderr);
  g_free (msg);
  return 1;
}

int
cli_fail (GError *error)
{
  int status;

  /* GIO's "Operation was cancelled" does not say what happened. */
  if (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
    {
      const char *cmd = g_get_prgname ();
      if (cmd == NULL)
        cmd = "diffuse";
      else if (g_str_has_prefix (cmd, "diffuse "))
        cmd += strlen ("diffuse ");
      status = cli_failf ("%s: interrupted; no file written", cmd);
    }
  else
    status = cli_failf ("%s", error ? error->message : "unknown error");

  g_clear_error (&error);
  return status;
}

/* ---- options ---- */

gboolean
cli_parse (const char *command, const char *params, const char *summary,
           GOptionEntry *entries, int *argc, char ***argv, GError **error)
{
  GOptionContext *ctx;
  char *prgname = g_strdup_printf ("diffuse %s", command);
  gboolean ok;

  g_set_prgname (prgname);
  ctx = g_option_context_new (params);
  g_option_context_set_summary (ctx, summary);
  g_option_context_add_main_entries (ctx, entries, NULL);
  ok = g_option_context_parse (ctx, argc, argv, error);
  g_option_context_free (ctx);
  if (ok && *argc > 1)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s: unexpected argument '%s' (options start with --; "
                   "see diffuse %s --help)", command, (*argv)[1], command);
      ok = FALSE;
    }
  else if (!ok)
    g_prefix_error (error, "%s: ", command);
  g_free (prgname);
  return ok;
}

gboolean
cli_parse_u64 (const char *what, const char *s, guint64 *out, GError **error)
{
  GError *err = NULL;

  if (!g_ascii_string_to_unsigned (s, 10, 0, G_MAXUINT64, out, &err))
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s '%s' is not a non-negative integer", what, s);
      g_error_free (err);
      return FALSE;
    }
  return TRUE;
}

gboolean
cli_parse_int_list (const char *what, const char *s, int *out, int max,
                    int *n, GError **error)
{
  char **parts = g_strsplit (s, ",", -1);
  int count = g_strv_length (parts);

  if (count == 0 || count > max)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s '%s': give 1 to %d comma-separated integers",
                   what, s, max);
      g_strfreev (parts);
      return FALSE;
    }
  for (int i = 0; i < count; i++)
    {
      gint64 v;
      if (!g_ascii_string_to_signed (g_strstrip (parts[i]), 10, 0, G_MAXINT,
                                     &v, NULL))
        {
          g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                       "%s '%s': '%s' is not a non-negative integer",
                       what, s, parts[i]);
          g_strfreev (parts);
          return FALSE;
        }
      out[i] = v;
    }
  *n = count;
  g_strfreev (parts);
  return TRUE;
}

gboolean
cli_parse_interval (const char *what, const char *s, double *lo, double *hi,
                    GError **error)
{
  char **parts = g_strsplit (s, ",", -1);
  double v[2];
  gboolean ok = g_strv_length (parts) == 2;

  for (int i = 0; ok && i < 2; i++)
    {
      char *end;
      const char *part = g_strstrip (parts[i]);

      v[i] = g_ascii_strtod (part, &end);
      ok = part[0] != '\0' && *end == '\0' && !isnan (v[i]);
    }
  ok = ok && v[0] >= 0 && !isinf (v[0]) && v[1] > v[0];
  g_strfreev (parts);
  if (!ok)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s '%s': give LOW,HIGH, the noise levels sigma = "
                   "sqrt ((1 - alpha_bar) / alpha_bar) between which to guide, "
                   "with 0 <= LOW < HIGH (HIGH may be inf)", what, s);
      return FALSE;
    }
  *lo = v[0];
  *hi = v[1];
  return TRUE;
}

gboolean
cli_check_guidance_acts (const DfSchedule *s, const DfSampleParams *p,
                         const char *interval, gboolean scale_given,
                         gboolean note, GError **error)
{
  gboolean conditional = p->guidance == DF_GUIDANCE_FREE && p->scale == 1.0;

  if (p->guidance == DF_GUIDANCE_NONE)
    return TRUE;
  if (conditional && interval)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--guidance-interval %s has no effect at guidance scale "
                   "1 (the conditional prediction at every step): drop it "
                   "or give another --guidance-scale", interval);
      return FALSE;
    }
  if (conditional || df_sample_guided_steps (s, p) != 0)
    return TRUE;
  if (!(interval || scale_given))
    {
      /* Nothing asked for explicitly: sample, but say why unguided. */
      if (note)
        g_printerr ("diffuse: note: none of the %d steps has a noise level in "
                    "the default guidance interval (" DF_FREE_GUIDE_TEXT
                    "], so the samples are conditional, not guided; "
                    "--guidance-interval 0,inf guides every step\n",
                    p->steps);
      return TRUE;
    }
  if (interval)
    g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                 "--guidance-interval %s holds none of the %d steps' noise "
                 "levels, so nothing is guided: widen it or give more "
                 "--steps (diffuse schedule --steps %d lists their sigma)",
                 interval, p->steps, p->steps);
  else
    g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                 "--guidance-scale %g has no effect: none of the %d steps "
                 "has a noise level in the default guidance interval ("
                 DF_FREE_GUIDE_TEXT "]; give more --steps or "
                 "--guidance-interval 0,inf", p->scale, p->steps);
  return FALSE;
}

gboolean
cli_check_folder (const char *option, const char *path, GError **error)
{
  if (g_file_test (path, G_FILE_TEST_IS_DIR))
    return TRUE;
  g_set_error (error, CLI_ERROR, CLI_ERROR_IO,
               g_file_test (path, G_FILE_TEST_EXISTS)
               ? "%s %s is a file: give a folder"
               : "%s %s: no such folder", option, path);
  return FALSE;
}

gboolean
cli_parse_class (DfModel *m, const char *s, int *label, GError **error)
{
  int k = df_model_num_classes (m), found;
  guint64 index;
  GString *names;

  if (k <= 0)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--class %s: %s is unconditional, it has no classes", s,
                   df_model_path (m));
      return FALSE;
    }
  /* A class's own name wins over an index (folders named 1..10). */
  found = df_model_class_lookup (m, s);
  if (found >= 0 && found < k)
    {
      *label = found;
      return TRUE;
    }
  if (g_ascii_string_to_unsigned (s, 10, 0, G_MAXUINT64, &index, NULL))
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--class %s is out of range: %s has classes 0 to %d",
                   s, df_model_path (m), k - 1);
      return FALSE;
    }

  names = g_string_new (NULL);
  for (int i = 0; i < k; i++)
    {
      const char *name = df_model_class_name (m, i);
      g_string_append_printf (names, "%s%d %s", i ? ", " : "", i,
                              name ? name : "?");
    }
  g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
               "--class: unknown class '%s'; %s has %s", s,
               df_model_path (m), names->str);
  g_string_free (names, TRUE);
  return FALSE;
}

/* ---- files ---- */

gboolean
cli_is_idx_folder (const char *dir, const char *prefix)
{
  const char *suffixes[] = { "-images-idx3-ubyte", "-images-idx3-ubyte.gz" };

  for (gsize i = 0; i < G_N_ELEMENTS (suffixes); i++)
    {
      char *name = g_strconcat (prefix, suffixes[i], NULL);
      char *p = g_build_filename (dir, name, NULL);
      gboolean found = g_file_test (p, G_FILE_TEST_IS_REGULAR);

      g_free (p);
      g_free (name);
      if (found)
        return TRUE;
    }
  return FALSE;
}

gboolean
cli_check_output_file (const char *option, const char *path, GError **error)
{
  char *dir;
  gboolean ok = TRUE;

  if (path == NULL)
    return TRUE;
  if (path[0] == '\0')
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s \"\": give a file name", option);
      return FALSE;
    }
  if (g_file_test (path, G_FILE_TEST_IS_DIR))
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s %s is a folder: give a file name", option, path);
      return FALSE;
    }
  dir = g_path_get_dirname (path);
  if (!g_file_test (dir, G_FILE_TEST_IS_DIR))
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_IO,
                   "%s %s: there is no folder %s (create it first)", option,
                   path, dir);
      ok = FALSE;
    }
  g_free (dir);
  return ok;
}

/* Where path would be written, as one name: its folder resolved (links,
 * "..", "."), then the file itself if it is a link. */
static char *
resolved_path (const char *path)
{
  char *dir = g_path_get_dirname (path);
  char *base = g_path_get_basename (path);
  char *real_dir = realpath (dir, NULL);
  char *joined, *real;

  joined = g_build_filename (real_dir ? real_dir : dir, base, NULL);
  real = realpath (joined, NULL);
  if (real != NULL)
    {
      g_free (joined);
      joined = g_strdup (real);
      free (real);
    }
  free (real_dir);
  g_free (dir);
  g_free (base);
  return joined;
}

gboolean
cli_same_file (const char *a, const char *b)
{
  char *ra = resolved_path (a), *rb = resolved_path (b);
  struct stat sa, sb;
  gboolean same = strcmp (ra, rb) == 0
                  || (stat (ra, &sa) == 0 && stat (rb, &sb) == 0
                      && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino);

  g_free (ra);
  g_free (rb);
  return same;
}

gboolean
cli_check_output_dir (const char *option, const char *dir, GError **error)
{
  char *at = g_strdup (dir);
  gboolean ok = TRUE;

  /* The folder, or the nearest part of its path that exists (where
   * g_mkdir_with_parents will start creating). */
  while (!g_file_test (at, G_FILE_TEST_EXISTS))
    {
      char *up = g_path_get_dirname (at);

      if (strcmp (up, at) == 0)
        {
          g_free (up);
          break;
        }
      g_free (at);
      at = up;
    }

  if (g_file_test (at, G_FILE_TEST_EXISTS)
      && !g_file_test (at, G_FILE_TEST_IS_DIR))
    {
      if (strcmp (at, dir) == 0)
        g_set_error (error, CLI_ERROR, CLI_ERROR_IO,
                     "%s %s is a file, not a folder: give a folder", option,
                     dir);
      else
        g_set_error (error, CLI_ERROR, CLI_ERROR_IO,
                     "%s %s: %s is a file, not a folder", option, dir, at);
      ok = FALSE;
    }
  else if (g_access (at, W_OK | X_OK) != 0)
    {
      int errsv = errno;

      if (strcmp (at, dir) == 0)
        g_set_error (error, CLI_ERROR, CLI_ERROR_IO,
                     "%s %s: cannot write in this folder: %s", option, dir,
                     g_strerror (errsv));
      else
        g_set_error (error, CLI_ERROR, CLI_ERROR_IO,
                     "%s %s: cannot create it in %s: %s", option, dir, at,
                     g_strerror (errsv));
      ok = FALSE;
    }
  g_free (at);
  return ok;
}

/* "XXXXXX”": the letters g_mkstemp put in place of XXXXXX, then the
 * closing quote of GLib's messages. */
static gboolean
is_temp_suffix (const char *s)
{
  for (int i = 0; i < 6; i++)
    if (!g_ascii_isalnum (s[i]))
      return FALSE;
  return g_str_has_prefix (s + 6, "\u201d");
}

void
cli_error_restore_path (GError *error, const char *path)
{
  char *shown, *open, *twice, *once;
  GString *msg;
  const char *m, *hit;
  gsize n;

  if (error == NULL || path == NULL || path[0] == '\0')
    return;

  /* GLib quotes file names: "“PATH.XXXXXX”" becomes "“PATH”". */
  shown = g_filename_display_name (path);
  open = g_strdup_printf ("\u201c%s.", shown);
  n = strlen (open);
  msg = g_string_new (NULL);
  for (m = error->message; (hit = strstr (m, open)) != NULL; )
    {
      const char *after = hit + n;

      if (is_temp_suffix (after))
        {
          g_string_append_len (msg, m, after - 1 - m);
          after += 6;
        }
      else
        g_string_append_len (msg, m, after - m);
      m = after;
    }
  g_string_append (msg, m);

  /* A failed rename then reads "“PATH” to “PATH”". */
  twice = g_strdup_printf ("\u201c%s\u201d to \u201c%s\u201d", shown, shown);
  once = g_strdup_printf ("\u201c%s\u201d", shown);
  hit = strstr (msg->str, twice);
  if (hit != NULL)
    {
      gsize at = hit - msg->str;

      g_string_erase (msg, at, strlen (twice));
      g_string_insert (msg, at, once);
    }

  g_free (error->message);
  error->message = g_string_free (msg, FALSE);
  g_free (twice);
  g_free (once);
  g_free (open);
  g_free (shown);
}

/* ---- weights ---- */

char *
cli_find_weights (const char *file, GError **error)
{
  const char *env = g_getenv ("DIFFUSE_WEIGHTS");
  GPtrArray *tried = g_ptr_array_new_with_free_func (g_free);
  char *found = NULL, *list;

  /* $DIFFUSE_WEIGHTS: a folder of weights, or one file standing in for the
   * default model. */
  if (env && *env)
    {
      if (g_file_test (env, G_FILE_TEST_IS_DIR))
        g_ptr_array_add (tried, g_build_filename (env, file, NULL));
      else if (strcmp (file, CLI_UNET_FILE) == 0)
        g_ptr_array_add (tried, g_strdup (env));
    }
  g_ptr_array_add (tried, g_build_filename ("weights", file, NULL));
  g_ptr_array_add (tried, g_build_filename (DF_WEIGHTS_DATADIR, file, NULL));
  g_ptr_array_add (tried, g_build_filename (DF_WEIGHTS_SOURCEDIR, file, NULL));

  for (guint i = 0; i < tried->len && !found; i++)
    if (g_file_test (tried->pdata[i], G_FILE_TEST_IS_REGULAR))
      found = g_strdup (tried->pdata[i]);

  if (!found)
    {
      g_ptr_array_add (tried, NULL);
      list = g_strjoinv (", ", (char **) tried->pdata);
      g_set_error (error, CLI_ERROR, CLI_ERROR_IO,
                   "no shipped weights %s found (looked in %s): pass --model "
                   "PATH or set DIFFUSE_WEIGHTS to the weights folder",
                   file, list);
      g_free (list);
    }
  g_ptr_array_free (tried, TRUE);
  return found;
}

DfModel *
cli_load_model (const char *path, const char *shipped, GError **error)
{
  char *found = NULL;
  DfModel *m;
  GError *err = NULL;

  if (path == NULL)
    {
      found = cli_find_weights (shipped, error);
      if (found == NULL)
        return NULL;
      path = found;
    }
  m = df_model_load (path, &err);
  if (m == NULL)
    {
      /* Name the file even if the engine's message does not. */
      if (strstr (err->message, path) == NULL)
        g_prefix_error (&err, "%s: ", path);
      g_propagate_error (error, err);
    }
  g_free (found);
  return m;
}

/* ---- images ---- */

static guint8
to_byte (float x)
{
  float v = roundf ((x + 1.0f) * 127.5f);

  /* NaN compares false both ways and ends black. */
  if (!(v > 0))
    return 0;
  return v >= 255 ? 255 : (guint8) v;
}

static cairo_status_t
append_bytes (void *closure, const unsigned char *data, unsigned int length)
{
  g_byte_array_append (closure, data, length);
  return CAIRO_STATUS_SUCCESS;
}

GBytes *
cli_png_encode (const float *x, int c, int h, int w, GError **error)
{
  gsize plane = (gsize) h * w;

  g_return_val_if_fail (c == 1 || c == 3, NULL);

  if (c == 1)
    {
      /* GdkPixbuf writes only RGB(A); cairo writes an A8 surface as an
       * 8-bit grayscale PNG. */
      cairo_surface_t *s = cairo_image_surface_create (CAIRO_FORMAT_A8, w, h);
      GByteArray *buf = g_byte_array_new ();
      cairo_status_t status;
      int stride = cairo_image_surface_get_stride (s);
      guint8 *d;

      cairo_surface_flush (s);
      d = cairo_image_surface_get_data (s);
      for (int y = 0; y < h; y++)
        for (int i = 0; i < w; i++)
          d[y * stride + i] = to_byte (x[y * w + i]);
      cairo_surface_mark_dirty (s);
      status = cairo_surface_write_to_png_stream (s, append_bytes, buf);
      cairo_surface_destroy (s);
      if (status != CAIRO_STATUS_SUCCESS)
        {
          g_set_error (error, CLI_ERROR, CLI_ERROR_IO, "PNG encoding failed: %s",
                       cairo_status_to_string (status));
          g_byte_array_free (buf, TRUE);
          return NULL;
        }
      return g_byte_array_free_to_bytes (buf);
    }
  else
    {
      GdkPixbuf *pb = gdk_pixbuf_new (GDK_COLORSPACE_RGB, FALSE, 8, w, h);
      int stride = gdk_pixbuf_get_rowstride (pb);
      guint8 *d = gdk_pixbuf_get_pixels (pb);
      char *png;
      gsize size;
      gboolean ok;

      for (int y = 0; y < h; y++)
        for (int i = 0; i < w; i++)
          for (int k = 0; k < 3; k++)
            d[y * stride + i * 3 + k] = to_byte (x[k * plane + y * w + i]);
      ok = gdk_pixbuf_save_to_buffer (pb, &png, &size, "png", error, NULL);
      g_object_unref (pb);
      return ok ? g_bytes_new_take (png, size) : NULL;
    }
}

int
cli_grid_cols (int n)
{
  int cols = (int) ceil (sqrt ((double) n));

  return cols < 1 ? 1 : cols;
}

float *
cli_tile (const float *x, int n, int c, int h, int w, int cols, int gap,
          int *gh, int *gw)
{
  int rows = (n + cols - 1) / cols;
  int ow = cols * w + (cols - 1) * gap, oh = rows * h + (rows - 1) * gap;
  float *out = g_new (float, (gsize) c * oh * ow);    /* [C,GH,GW] */

  for (gsize i = 0; i < (gsize) c * oh * ow; i++)
    out[i] = 1.0f;
  for (int k = 0; k < n; k++)
    {
      int oy = (k / cols) * (h + gap), ox = (k % cols) * (w + gap);
      for (int ch = 0; ch < c; ch++)
        for (int y = 0; y < h; y++)
          memcpy (out + ((gsize) ch * oh + oy + y) * ow + ox,
                  x + (((gsize) k * c + ch) * h + y) * w,
                  sizeof (float) * w);
    }
  *gh = oh;
  *gw = ow;
  return out;
}

/* ---- output ---- */

struct _CliOutput {
  char      *dir;
  GPtrArray *names;     /* char * */
  GPtrArray *bytes;     /* GBytes * */
};

CliOutput *
cli_output_new (const char *dir)
{
  CliOutput *o = g_new0 (CliOutput, 1);

  o->dir = g_strdup (dir);
  o->names = g_ptr_array_new_with_free_func (g_free);
  o->bytes = g_ptr_array_new_with_free_func ((GDestroyNotify) g_bytes_unref);
  return o;
}

void
cli_output_free (CliOutput *o)
{
  if (o == NULL)
    return;
  g_ptr_array_free (o->names, TRUE);
  g_ptr_array_free (o->bytes, TRUE);
  g_free (o->dir);
  g_free (o);
}

void
cli_output_add (CliOutput *o, const char *name, GBytes *bytes)
{
  g_ptr_array_add (o->names, g_strdup (name));
  g_ptr_array_add (o->bytes, bytes);
}

gboolean
cli_output_commit (CliOutput *o, GError **error)
{
  guint i;

  if (o->dir && *o->dir && g_mkdir_with_parents (o->dir, 0755) != 0)
    {
      int errsv = errno;
      g_set_error (error, CLI_ERROR, CLI_ERROR_IO,
                   "cannot create the output folder %s: %s", o->dir,
                   g_strerror (errsv));
      return FALSE;
    }
  for (i = 0; i < o->names->len; i++)
    {
      char *path = g_build_filename (o->dir ? o->dir : ".",
                                     o->names->pdata[i], NULL);
      gsize size;
      const char *data = g_bytes_get_data (o->bytes->pdata[i], &size);
      GError *err = NULL;

      /* g_file_set_contents_full writes a temporary file and renames it. */
      if (!g_file_set_contents_full (path, data, size,
                                     G_FILE_SET_CONTENTS_CONSISTENT, 0644,
                                     &err))
        {
          cli_error_restore_path (err, path);
          g_propagate_prefixed_error (error, err, "writing the results: ");
          g_free (path);
          break;
        }
      g_free (path);
    }
  if (i == o->names->len)
    return TRUE;

  /* All or nothing: take back what was written. */
  for (guint j = 0; j < i; j++)
    {
      char *path = g_build_filename (o->dir, o->names->pdata[j], NULL);
      g_unlink (path);
      g_free (path);
    }
  return FALSE;
}

gboolean
cli_output_images (CliOutput *o, const float *x, int n, int c, int h, int w,
                   const char *overview, int cols, GError **error)
{
  gsize image = (gsize) c * h * w;
  float *tiled;
  int gh, gw;
  GBytes *png;

  for (int i = 0; i < n; i++)
    {
      char name[32];
      png = cli_png_encode (x + i * image, c, h, w, error);
      if (png == NULL)
        return FALSE;
      g_snprintf (name, sizeof name, "%04d.png", i);
      cli_output_add (o, name, png);
    }
  tiled = cli_tile (x, n, c, h, w, cols, 2, &gh, &gw);
  png = cli_png_encode (tiled, c, gh, gw, error);
  g_free (tiled);
  if (png == NULL)
    return FALSE;
  cli_output_add (o, overview, png);
  return TRUE;
}

/* ---- progress ---- */

char *
cli_format_duration (double seconds)
{
  long s;

  if (!isfinite (seconds) || seconds < 0)
    return g_strdup ("?");
  s = lround (seconds);
  if (s >= 3600)
    return g_strdup_printf ("%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  return g_strdup_printf ("%ld:%02ld", s / 60, s % 60);
}

void
cli_progress_init (CliProgress *p, const char *label, int total,
                   gboolean quiet)
{
  memset (p, 0, sizeof *p);
  p->label = label;
  p->total = total;
  p->quiet = quiet;
  p->tty = isatty (STDERR_FILENO);
  p->start = g_get_monotonic_time ();
  p->last_print = 0;
}

void
cli_progress_text (CliProgress *p, const char *text, gboolean force)
{
  gint64 now = g_get_monotonic_time ();
  gint64 every = p->tty ? G_USEC_PER_SEC / 10 : G_USEC_PER_SEC;
  int len;

  if (p->quiet)
    return;
  if (!force && p->last_print != 0 && now - p->last_print < every)
    return;
  p->last_print = now;
  len = strlen (text);
  if (p->tty)
    fprintf (stderr, "\r%s%*s", text, p->width > len ? p->width - len : 0, "");
  else
    fprintf (stderr, "%s\n", text);
  p->width = len;
  fflush (stderr);
}

void
cli_progress_step (CliProgress *p)
{
  double elapsed, rate;
  char *eta, *line;

  p->done++;
  if (p->quiet)
    return;
  elapsed = (g_get_monotonic_time () - p->start) / (double) G_USEC_PER_SEC;
  rate = elapsed > 0 ? p->done / elapsed : 0;
  eta = cli_format_duration (rate > 0 ? (p->total - p->done) / rate : -1);
  line = g_strdup_printf ("%s: step %d/%d, %.2f it/s, ETA %s", p->label,
                          p->done, p->total, rate, eta);
  cli_progress_text (p, line, p->done >= p->total);
  g_free (line);
  g_free (eta);
}

void
cli_progress_finish (CliProgress *p)
{
  if (!p->quiet && p->tty && p->width > 0)
    {
      fputc ('\n', stderr);
      fflush (stderr);
    }
  p->width = 0;
}

void
cli_progress_sampler (gpointer data, int step, int total, const float *x0,
                      int n)
{
  cli_progress_step (data);
}

/* ---- cancellation ---- */

static GCancellable *cancellable;

/* Signals are blocked in every thread (OpenMP and OpenBLAS threads start
 * later and inherit the mask) and taken here, where cancelling is safe. */
static gpointer
signal_thread (gpointer data)
{
  sigset_t *set = data;
  int sig, count = 0;

  while (sigwait (set, &sig) == 0)
    {
      if (++count > 1)
        _exit (128 + sig);
      g_cancellable_cancel (cancellable);
    }
  return NULL;
}

GCancellable *
cli_cancellable (void)
{
  static sigset_t set;

  if (cancellable == NULL)
    {
      cancellable = g_cancellable_new ();
      sigemptyset (&set);
      sigaddset (&set, SIGINT);
      sigaddset (&set, SIGTERM);
      pthread_sigmask (SIG_BLOCK, &set, NULL);
      g_thread_unref (g_thread_new ("signals", signal_thread, &set));
    }
  return cancellable;
}
