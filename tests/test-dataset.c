/* test-dataset.c: IDX files and class folders load with the right values,
 * and every malformed input is an error naming the file. */
#include <gdk-pixbuf/gdk-pixbuf.h>
#include <glib/gstdio.h>
#include <math.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "dataset.h"

/* ---- fixtures ---- */

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

static char *
make_tmp (const char *tmpl)
{
  GError *error = NULL;
  char *dir = g_dir_make_tmp (tmpl, &error);

  g_assert_no_error (error);
  return dir;
}

static void
put_be32 (GByteArray *b, guint32 v)
{
  guint8 x[4] = { v >> 24, v >> 16, v >> 8, v };
  g_byte_array_append (b, x, 4);
}

/* IDX bytes: images [n,rows,cols] with pixel (i,y,x) = (i*31 + y*7 + x*3)
 * mod 256, labels i mod 3. */
static GByteArray *
idx_images (guint32 magic, int n, int rows, int cols)
{
  GByteArray *b = g_byte_array_new ();

  put_be32 (b, magic);
  put_be32 (b, n);
  put_be32 (b, rows);
  put_be32 (b, cols);
  for (int i = 0; i < n; i++)
    for (int y = 0; y < rows; y++)
      for (int x = 0; x < cols; x++)
        {
          guint8 v = (i * 31 + y * 7 + x * 3) % 256;
          g_byte_array_append (b, &v, 1);
        }
  return b;
}

static GByteArray *
idx_labels (guint32 magic, int n)
{
  GByteArray *b = g_byte_array_new ();

  put_be32 (b, magic);
  put_be32 (b, n);
  for (int i = 0; i < n; i++)
    {
      guint8 v = i % 3;
      g_byte_array_append (b, &v, 1);
    }
  return b;
}

/* Write b (its first len bytes, -1: all) to dir/name, gzipped or not. */
static char *
write_file (const char *dir, const char *name, GByteArray *b, int len,
            gboolean gz)
{
  char *path = g_build_filename (dir, name, NULL);
  gsize n = len < 0 ? b->len : (gsize) len;

  if (gz)
    {
      gzFile f = gzopen (path, "wb");
      g_assert_nonnull (f);
      g_assert_cmpint (gzwrite (f, b->data, n), ==, (int) n);
      g_assert_cmpint (gzclose (f), ==, Z_OK);
    }
  else
    {
      GError *error = NULL;
      g_file_set_contents (path, (const char *) b->data, n, &error);
      g_assert_no_error (error);
    }
  g_byte_array_unref (b);
  return path;
}

/* A constant-colour PNG, w x h, RGB or RGBA. */
static void
write_png (const char *path, int w, int h, guint8 r, guint8 g, guint8 bl,
           int alpha)
{
  GdkPixbuf *pb = gdk_pixbuf_new (GDK_COLORSPACE_RGB, alpha >= 0, 8, w, h);
  GError *error = NULL;

  gdk_pixbuf_fill (pb, ((guint32) r << 24) | ((guint32) g << 16)
                       | ((guint32) bl << 8) | (alpha >= 0 ? alpha : 255));
  gdk_pixbuf_save (pb, path, "png", &error, NULL);
  g_assert_no_error (error);
  g_object_unref (pb);
}

/* ---- IDX ---- */

static void
check_idx_values (gboolean gz)
{
  char *dir = make_tmp ("df-idx-XXXXXX");
  char *img = write_file (dir, gz ? "i.gz" : "i", idx_images (0x803, 5, 4, 6),
                          -1, gz);
  char *lab = write_file (dir, gz ? "l.gz" : "l", idx_labels (0x801, 5), -1,
                          gz);
  GError *error = NULL;
  DfDataset *d = df_dataset_load_idx (img, lab, 0, &error);
  double worst = 0;

  g_assert_no_error (error);
  g_assert_nonnull (d);
  g_assert_cmpint (d->n, ==, 5);
  g_assert_cmpint (d->c, ==, 1);
  g_assert_cmpint (d->h, ==, 4);
  g_assert_cmpint (d->w, ==, 6);
  for (int i = 0; i < 5; i++)
    {
      g_assert_cmpint (d->labels[i], ==, i % 3);
      for (int y = 0; y < 4; y++)
        for (int x = 0; x < 6; x++)
          {
            double want = ((i * 31 + y * 7 + x * 3) % 256) / 127.5 - 1.0;
            worst = MAX (worst, fabs (d->images[(i * 4 + y) * 6 + x] - want));
          }
    }
  g_test_message ("worst pixel difference %g", worst);
  g_assert_cmpfloat (worst, <=, 1e-6);
  g_assert_cmpint (d->num_classes, ==, 10);
  g_assert_cmpstr (d->class_names[0], ==, "0");
  g_assert_cmpstr (d->class_names[9], ==, "9");
  g_assert_null (d->class_names[10]);

  df_dataset_free (d);
  rm_rf (dir);
  g_free (img);
  g_free (lab);
  g_free (dir);
}

static void
test_idx_gz (void)
{
  check_idx_values (TRUE);
}

static void
test_idx_plain (void)
{
  check_idx_values (FALSE);
}

/* 2x2 -> 4x4 against torch.nn.functional.interpolate (bilinear,
 * align_corners=False). */
static void
test_idx_resize (void)
{
  static const float want[16] = { -1.0f, -0.5f, 0.5f, 1.0f,
                                  -0.5f, -0.25f, 0.25f, 0.5f,
                                  0.5f, 0.25f, -0.25f, -0.5f,
                                  1.0f, 0.5f, -0.5f, -1.0f };
  static const guint8 px[4] = { 0, 255, 255, 0 };
  char *dir = make_tmp ("df-idx-XXXXXX");
  GByteArray *b = g_byte_array_new ();
  char *img, *lab;
  GError *error = NULL;
  DfDataset *d;
  double worst = 0;

  put_be32 (b, 0x803);
  put_be32 (b, 1);
  put_be32 (b, 2);
  put_be32 (b, 2);
  g_byte_array_append (b, px, 4);
  img = write_file (dir, "i", b, -1, FALSE);
  lab = write_file (dir, "l", idx_labels (0x801, 1), -1, FALSE);

  d = df_dataset_load_idx (img, lab, 4, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->h, ==, 4);
  g_assert_cmpint (d->w, ==, 4);
  for (int k = 0; k < 16; k++)
    worst = MAX (worst, fabs (d->images[k] - want[k]));
  g_test_message ("worst difference from torch %g", worst);
  g_assert_cmpfloat (worst, <=, 1e-6);

  df_dataset_free (d);
  rm_rf (dir);
  g_free (img);
  g_free (lab);
  g_free (dir);
}

/* A failing load: no data set, an error of that code naming the file. */
static void
assert_fails (const char *img, const char *lab, int code, const char *name,
              const char *also)
{
  GError *error = NULL;
  DfDataset *d = df_dataset_load_idx (img, lab, 0, &error);

  g_assert_null (d);
  g_assert_error (error, DF_DATASET_ERROR, code);
  g_test_message ("%s", error->message);
  g_assert_nonnull (strstr (error->message, name));
  if (also != NULL)
    g_assert_nonnull (strstr (error->message, also));
  g_error_free (error);
}

static void
test_idx_wrong_magic (void)
{
  char *dir = make_tmp ("df-idx-XXXXXX");
  /* Labels where images are expected, and the reverse. */
  char *img = write_file (dir, "i.gz", idx_images (0x803, 3, 4, 4), -1, TRUE);
  char *lab = write_file (dir, "l.gz", idx_labels (0x801, 3), -1, TRUE);
  char *bad = write_file (dir, "bad.gz", idx_images (0x80b, 3, 4, 4), -1,
                          TRUE);

  assert_fails (lab, img, DF_DATASET_ERROR_FORMAT, lab, "magic");
  assert_fails (img, img, DF_DATASET_ERROR_FORMAT, img, "magic");
  assert_fails (bad, lab, DF_DATASET_ERROR_FORMAT, bad, "magic");

  rm_rf (dir);
  g_free (img);
  g_free (lab);
  g_free (bad);
  g_free (dir);
}

static void
test_idx_truncated (void)
{
  char *dir = make_tmp ("df-idx-XXXXXX");
  int full = 16 + 3 * 4 * 4;
  char *img_gz = write_file (dir, "i.gz", idx_images (0x803, 3, 4, 4),
                             full - 5, TRUE);
  char *img = write_file (dir, "i", idx_images (0x803, 3, 4, 4), full - 1,
                          FALSE);
  char *head = write_file (dir, "h", idx_images (0x803, 3, 4, 4), 10, FALSE);
  char *lab = write_file (dir, "l", idx_labels (0x801, 3), -1, FALSE);
  char *lab_short = write_file (dir, "ls", idx_labels (0x801, 3), 10, FALSE);
  char *gz_cut, *text;
  gsize len;

  assert_fails (img_gz, lab, DF_DATASET_ERROR_FORMAT, img_gz, "truncated");
  assert_fails (img, lab, DF_DATASET_ERROR_FORMAT, img, "truncated");
  assert_fails (head, lab, DF_DATASET_ERROR_FORMAT, head, "truncated");
  assert_fails (img_gz, lab_short, DF_DATASET_ERROR_FORMAT, img_gz, NULL);

  /* A gzip stream cut short (not only short content): damaged. */
  g_assert_true (g_file_get_contents (img_gz, &text, &len, NULL));
  gz_cut = g_build_filename (dir, "cut.gz", NULL);
  g_assert_true (g_file_set_contents (gz_cut, text, len - 12, NULL));
  assert_fails (gz_cut, lab, DF_DATASET_ERROR_FORMAT, gz_cut, NULL);

  rm_rf (dir);
  g_free (text);
  g_free (gz_cut);
  g_free (img_gz);
  g_free (img);
  g_free (head);
  g_free (lab);
  g_free (lab_short);
  g_free (dir);
}

static void
test_idx_count_mismatch (void)
{
  char *dir = make_tmp ("df-idx-XXXXXX");
  char *img = write_file (dir, "i", idx_images (0x803, 4, 4, 4), -1, FALSE);
  char *lab = write_file (dir, "l", idx_labels (0x801, 3), -1, FALSE);

  assert_fails (img, lab, DF_DATASET_ERROR_FORMAT, lab, "4 images");

  rm_rf (dir);
  g_free (img);
  g_free (lab);
  g_free (dir);
}

static void
test_idx_missing (void)
{
  char *dir = make_tmp ("df-idx-XXXXXX");
  char *lab = write_file (dir, "l", idx_labels (0x801, 3), -1, FALSE);
  char *none = g_build_filename (dir, "no-such-images.gz", NULL);
  GError *error = NULL;
  DfDataset *d;

  assert_fails (none, lab, DF_DATASET_ERROR_IO, none, NULL);

  /* A folder with images but no labels file beside them. */
  g_free (write_file (dir, "train-images-idx3-ubyte.gz",
                      idx_images (0x803, 3, 4, 4), -1, TRUE));
  g_remove (lab);
  d = df_dataset_load (dir, "train", 0, 1, &error);
  g_assert_null (d);
  g_assert_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_IO);
  g_test_message ("%s", error->message);
  g_assert_nonnull (strstr (error->message, "train-labels-idx1-ubyte"));
  g_clear_error (&error);

  rm_rf (dir);
  g_free (lab);
  g_free (none);
  g_free (dir);
}

/* A folder called fashion... holding IDX files gets Fashion-MNIST's names;
 * split test reads t10k-*; 3 channels replicate the gray. */
static void
test_idx_folder_fashion (void)
{
  char *dir = make_tmp ("df-fashion-XXXXXX");
  GError *error = NULL;
  DfDataset *d;

  g_free (write_file (dir, "train-images-idx3-ubyte.gz",
                      idx_images (0x803, 6, 4, 4), -1, TRUE));
  g_free (write_file (dir, "train-labels-idx1-ubyte.gz",
                      idx_labels (0x801, 6), -1, TRUE));
  g_free (write_file (dir, "t10k-images-idx3-ubyte",
                      idx_images (0x803, 2, 4, 4), -1, FALSE));
  g_free (write_file (dir, "t10k-labels-idx1-ubyte",
                      idx_labels (0x801, 2), -1, FALSE));

  d = df_dataset_load (dir, NULL, 0, 1, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->n, ==, 6);
  g_assert_cmpint (d->num_classes, ==, 10);
  g_assert_cmpstr (d->class_names[0], ==, "T-shirt/top");
  g_assert_cmpstr (d->class_names[9], ==, "Ankle boot");
  df_dataset_free (d);

  d = df_dataset_load (dir, "test", 0, 3, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->n, ==, 2);
  g_assert_cmpint (d->c, ==, 3);
  for (int c = 0; c < 3; c++)
    g_assert_cmpfloat (d->images[(1 * 3 + c) * 16 + 5], ==,
                       ((31 + 7 + 3) % 256) / 127.5f - 1.0f);
  df_dataset_free (d);

  rm_rf (dir);
  g_free (dir);
}

/* The real Fashion-MNIST test split, when installed. */
static void
test_idx_real_fashion (void)
{
  const char *dir = "/usr/share/datasets/fashion-mnist";
  GError *error = NULL;
  DfDataset *d;
  int counts[10] = { 0 };
  double lo = 1, hi = -1;

  if (!g_file_test (dir, G_FILE_TEST_IS_DIR))
    {
      g_test_skip ("no /usr/share/datasets/fashion-mnist");
      return;
    }
  d = df_dataset_load (dir, "test", 32, 1, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->n, ==, 10000);
  g_assert_cmpint (d->h, ==, 32);
  g_assert_cmpstr (d->class_names[7], ==, "Sneaker");
  for (int i = 0; i < d->n; i++)
    counts[d->labels[i]]++;
  for (gsize k = 0; k < (gsize) d->n * 32 * 32; k++)
    {
      lo = MIN (lo, d->images[k]);
      hi = MAX (hi, d->images[k]);
    }
  g_test_message ("pixel range [%g, %g]", lo, hi);
  for (int c = 0; c < 10; c++)
    g_assert_cmpint (counts[c], ==, 1000);
  g_assert_cmpfloat (lo, ==, -1.0);
  g_assert_cmpfloat (hi, <=, 1.0);
  g_assert_cmpfloat (hi, >, 0.9);
  df_dataset_free (d);
}

/* ---- folders ---- */

static void
test_folder_classes (void)
{
  char *dir = make_tmp ("df-folder-XXXXXX");
  char *a = g_build_filename (dir, "zebra", NULL);
  char *b = g_build_filename (dir, "apple", NULL);
  char *p;
  GError *error = NULL;
  DfDataset *d;
  double worst = 0;

  /* zebra: 2 red images; apple: 1 green, 1 half-transparent black (on
   * white: mid gray); a .txt file that is not an image. */
  g_mkdir (a, 0755);
  g_mkdir (b, 0755);
  for (int i = 0; i < 2; i++)
    {
      p = g_strdup_printf ("%s/img%d.PNG", a, i);
      write_png (p, 10, 6, 200, 0, 0, -1);
      g_free (p);
    }
  p = g_build_filename (b, "g.png", NULL);
  write_png (p, 8, 8, 0, 255, 0, -1);
  g_free (p);
  p = g_build_filename (b, "h.png", NULL);
  write_png (p, 8, 8, 0, 0, 0, 0);
  g_free (p);
  p = g_build_filename (b, "notes.txt", NULL);
  g_file_set_contents (p, "not an image", -1, NULL);
  g_free (p);

  d = df_dataset_load (dir, NULL, 4, 1, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->n, ==, 4);
  g_assert_cmpint (d->c, ==, 1);
  g_assert_cmpint (d->h, ==, 4);
  g_assert_cmpint (d->num_classes, ==, 2);
  g_assert_cmpstr (d->class_names[0], ==, "apple");
  g_assert_cmpstr (d->class_names[1], ==, "zebra");
  g_assert_null (d->class_names[2]);
  g_assert_cmpint (d->labels[0], ==, 0);
  g_assert_cmpint (d->labels[1], ==, 0);
  g_assert_cmpint (d->labels[2], ==, 1);
  g_assert_cmpint (d->labels[3], ==, 1);

  /* Constant images stay constant when scaled: gray = 0.299R+0.587G+0.114B,
   * alpha 0 composites to white. */
  for (int k = 0; k < 16; k++)
    {
      worst = MAX (worst, fabs (d->images[k] - (0.587 * 2 - 1)));
      worst = MAX (worst, fabs (d->images[16 + k] - 1.0));
      worst = MAX (worst, fabs (d->images[32 + k]
                                - (0.299 * 200 / 255.0 * 2 - 1)));
    }
  g_test_message ("worst gray difference %g", worst);
  g_assert_cmpfloat (worst, <=, 1e-5);
  df_dataset_free (d);

  /* RGB: the red image's channels. */
  d = df_dataset_load_folder (dir, 4, 3, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->c, ==, 3);
  g_assert_cmpfloat (fabs (d->images[2 * 48 + 0] - (200 / 127.5 - 1)), <=,
                     1e-5);
  g_assert_cmpfloat (d->images[2 * 48 + 16], ==, -1.0f);
  g_assert_cmpfloat (d->images[2 * 48 + 32], ==, -1.0f);
  df_dataset_free (d);

  rm_rf (dir);
  g_free (a);
  g_free (b);
  g_free (dir);
}

static void
test_folder_flat (void)
{
  char *dir = make_tmp ("df-flat-XXXXXX");
  char *base = g_path_get_basename (dir);
  GError *error = NULL;
  DfDataset *d;

  for (int i = 0; i < 3; i++)
    {
      char *p = g_strdup_printf ("%s/%d.png", dir, i);
      write_png (p, 5, 5, 10 * i, 10 * i, 10 * i, -1);
      g_free (p);
    }
  d = df_dataset_load (dir, NULL, 0, 1, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->n, ==, 3);
  g_assert_cmpint (d->h, ==, 5);
  g_assert_cmpint (d->num_classes, ==, 1);
  g_assert_cmpstr (d->class_names[0], ==, base);
  for (int i = 0; i < 3; i++)
    g_assert_cmpint (d->labels[i], ==, 0);
  df_dataset_free (d);

  rm_rf (dir);
  g_free (base);
  g_free (dir);
}

static void
test_folder_unreadable (void)
{
  char *dir = make_tmp ("df-bad-XXXXXX");
  char *cls = g_build_filename (dir, "cls", NULL);
  char *good = g_build_filename (cls, "a.png", NULL);
  char *bad = g_build_filename (cls, "b.png", NULL);
  GError *error = NULL;
  DfDataset *d;

  g_mkdir (cls, 0755);
  write_png (good, 4, 4, 1, 2, 3, -1);
  g_file_set_contents (bad, "\x89PNG garbage bytes, not an image", -1, NULL);
  d = df_dataset_load (dir, NULL, 4, 1, &error);
  g_assert_null (d);
  g_assert_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT);
  g_test_message ("%s", error->message);
  g_assert_nonnull (strstr (error->message, bad));
  g_clear_error (&error);

  rm_rf (dir);
  g_free (cls);
  g_free (good);
  g_free (bad);
  g_free (dir);
}

static void
test_folder_empty (void)
{
  char *dir = make_tmp ("df-empty-XXXXXX");
  char *sub = g_build_filename (dir, "nothing", NULL);
  GError *error = NULL;
  DfDataset *d;

  g_mkdir (sub, 0755);
  d = df_dataset_load (dir, NULL, 8, 1, &error);
  g_assert_null (d);
  g_assert_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_EMPTY);
  g_assert_nonnull (strstr (error->message, dir));
  g_clear_error (&error);

  d = df_dataset_load (sub, NULL, 8, 1, &error);
  g_assert_null (d);
  g_assert_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_EMPTY);
  g_clear_error (&error);

  rm_rf (dir);
  g_free (sub);
  g_free (dir);
}

/* An empty class folder beside full ones was skipped: the classes after it
 * were renumbered and a class the user made was missing from the model. */
static void
test_folder_empty_class (void)
{
  char *dir = make_tmp ("df-empty-class-XXXXXX");
  char *full = g_build_filename (dir, "bags", NULL);
  char *empty = g_build_filename (dir, "coats", NULL);
  char *last = g_build_filename (dir, "shoes", NULL);
  char *p;
  GError *error = NULL;
  DfDataset *d;

  g_mkdir (full, 0755);
  g_mkdir (empty, 0755);
  g_mkdir (last, 0755);
  p = g_build_filename (full, "a.png", NULL);
  write_png (p, 4, 4, 9, 9, 9, -1);
  g_free (p);
  p = g_build_filename (last, "b.png", NULL);
  write_png (p, 4, 4, 90, 90, 90, -1);
  g_free (p);

  /* Not an image either: a folder of notes is as empty. */
  p = g_build_filename (empty, "notes.txt", NULL);
  g_file_set_contents (p, "no pictures yet", -1, NULL);
  g_free (p);

  d = df_dataset_load (dir, NULL, 4, 1, &error);
  g_assert_null (d);
  g_assert_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_EMPTY);
  g_test_message ("%s", error->message);
  g_assert_true (g_str_has_prefix (error->message, empty));
  g_assert_null (strstr (error->message, last));
  g_clear_error (&error);

  /* With an image in it, three classes in name order. */
  p = g_build_filename (empty, "c.png", NULL);
  write_png (p, 4, 4, 200, 200, 200, -1);
  g_free (p);
  d = df_dataset_load (dir, NULL, 4, 1, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->num_classes, ==, 3);
  g_assert_cmpstr (d->class_names[1], ==, "coats");
  g_assert_cmpint (d->labels[2], ==, 2);
  df_dataset_free (d);

  rm_rf (dir);
  g_free (full);
  g_free (empty);
  g_free (last);
  g_free (dir);
}

/* ---- image decoding ---- */

/* A w x h image with a different colour at every pixel, as type ("png",
 * "jpeg"); with alpha (PNG only) the alpha varies too. */
static void
write_gradient (const char *path, const char *type, int w, int h,
                gboolean alpha)
{
  GdkPixbuf *pb = gdk_pixbuf_new (GDK_COLORSPACE_RGB, alpha, 8, w, h);
  guint8 *px = gdk_pixbuf_get_pixels (pb);
  int stride = gdk_pixbuf_get_rowstride (pb), nch = alpha ? 4 : 3;
  GError *error = NULL;

  for (int y = 0; y < h; y++)
    for (int x = 0; x < w; x++)
      {
        guint8 *p = px + y * stride + x * nch;

        p[0] = (x * 255) / (w - 1);
        p[1] = (y * 255) / (h - 1);
        p[2] = ((x ^ y) * 5) & 255;
        if (alpha)
          p[3] = (x * 7 + y * 3) & 255;
      }
  gdk_pixbuf_save (pb, path, type, &error, NULL);
  g_assert_no_error (error);
  g_object_unref (pb);
}

/* Keep the first half of the file, as a copy that stopped early does. */
static void
cut_in_half (const char *path)
{
  char *text;
  gsize len;

  g_assert_true (g_file_get_contents (path, &text, &len, NULL));
  g_assert_cmpuint (len, >, 200);
  g_assert_true (g_file_set_contents (path, text, len / 2, NULL));
  g_free (text);
}

/* Loading dir fails on the image file, in the form every unreadable image
 * has: "FILE: cannot read the image: WHY (remove or replace it)". */
static void
assert_image_error (const char *dir, const char *file, const char *why)
{
  GError *error = NULL;
  DfDataset *d = df_dataset_load (dir, NULL, 16, 3, &error);
  char *head = g_strdup_printf ("%s: cannot read the image: ", file);

  g_assert_null (d);
  g_assert_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT);
  g_test_message ("%s", error->message);
  g_assert_true (g_str_has_prefix (error->message, head));
  g_assert_true (g_str_has_suffix (error->message, " (remove or replace it)"));
  g_assert_nonnull (strstr (error->message, why));
  g_clear_error (&error);
  g_free (head);
}

/* A copy cut short decoded without an error: the rows it lacks came out
 * gray or as garbage and were trained on. */
static void
check_truncated (const char *type, const char *ext, const char *why)
{
  char *dir = make_tmp ("df-cut-XXXXXX");
  char *cls = g_build_filename (dir, "cls", NULL);
  char *good = g_build_filename (cls, "a.png", NULL);
  char *name = g_strconcat ("b.", ext, NULL);
  char *cut = g_build_filename (cls, name, NULL);
  char *zero = g_build_filename (cls, "c.png", NULL);
  GError *error = NULL;
  DfDataset *d;

  g_mkdir (cls, 0755);
  write_png (good, 4, 4, 1, 2, 3, -1);
  write_gradient (cut, type, 128, 128, FALSE);

  /* Whole, it loads.  (Large enough that half of it holds image data, not
   * only the header, which GdkPixbuf's loaders did report.) */
  d = df_dataset_load (dir, NULL, 16, 3, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->n, ==, 2);
  df_dataset_free (d);

  /* Cut in half, it is an error naming it, as an empty file is. */
  cut_in_half (cut);
  assert_image_error (dir, cut, why);
  g_assert_true (g_file_set_contents (zero, "", 0, NULL));
  g_remove (cut);
  assert_image_error (dir, zero, "empty");

  rm_rf (dir);
  g_free (cls);
  g_free (good);
  g_free (name);
  g_free (cut);
  g_free (zero);
  g_free (dir);
}

static void
test_folder_truncated_png (void)
{
  check_truncated ("png", "png", "truncated");
}

static void
test_folder_truncated_jpeg (void)
{
  check_truncated ("jpeg", "jpg", "truncated");
}

/* What the folder loader gave before it fed a GdkPixbufLoader itself:
 * gdk_pixbuf_new_from_file_at_scale, stretched, alpha on white, then gray
 * or RGB in [-1, 1]. */
static void
reference_pixels (const char *path, int size, int channels, float *dst)
{
  GError *error = NULL;
  GdkPixbuf *pb = gdk_pixbuf_new_from_file_at_scale (path, size, size, FALSE,
                                                     &error);
  const guint8 *px;
  int stride, nch;

  g_assert_no_error (error);
  g_assert_cmpint (gdk_pixbuf_get_width (pb), ==, size);
  g_assert_cmpint (gdk_pixbuf_get_height (pb), ==, size);
  px = gdk_pixbuf_read_pixels (pb);
  stride = gdk_pixbuf_get_rowstride (pb);
  nch = gdk_pixbuf_get_n_channels (pb);
  for (int y = 0; y < size; y++)
    for (int x = 0; x < size; x++)
      {
        const guint8 *p = px + y * stride + x * nch;
        float a = nch == 4 ? p[3] / 255.0f : 1.0f, rgb[3];

        for (int c = 0; c < 3; c++)
          rgb[c] = (p[c] / 255.0f) * a + (1.0f - a);
        if (channels == 1)
          dst[y * size + x] = (0.299f * rgb[0] + 0.587f * rgb[1]
                               + 0.114f * rgb[2]) * 2.0f - 1.0f;
        else
          for (int c = 0; c < 3; c++)
            dst[(c * size + y) * size + x] = rgb[c] * 2.0f - 1.0f;
      }
  g_object_unref (pb);
}

/* Reading through a GdkPixbufLoader must not change a valid image's pixels:
 * a two-colour one against values worked out by hand, and gradients (a
 * JPEG decoded at reduced size, a PNG with alpha) against the old path. */
static void
test_folder_valid_pixels (void)
{
  char *dir = make_tmp ("df-pixels-XXXXXX");
  char *cls = g_build_filename (dir, "cls", NULL);
  char *two = g_build_filename (cls, "a-two.png", NULL);
  char *jpg = g_build_filename (cls, "b-grad.jpg", NULL);
  char *png = g_build_filename (cls, "c-grad.png", NULL);
  GdkPixbuf *pb = gdk_pixbuf_new (GDK_COLORSPACE_RGB, TRUE, 8, 8, 2);
  GError *error = NULL;
  double a = 128 / 255.0, worst = 0;
  /* Left half opaque (200, 0, 0), right half (0, 0, 255) at alpha 128:
   * on white, (1 - a, 1 - a, 1). */
  double rgb[2][3] = { { 200 / 255.0, 0, 0 }, { 1 - a, 1 - a, 1 } };

  g_mkdir (cls, 0755);
  for (int y = 0; y < 2; y++)
    for (int x = 0; x < 8; x++)
      {
        guint8 *p = gdk_pixbuf_get_pixels (pb)
                    + y * gdk_pixbuf_get_rowstride (pb) + x * 4;
        guint8 v[4] = { 200, 0, 0, 255 }, w[4] = { 0, 0, 255, 128 };

        memcpy (p, x < 4 ? v : w, 4);
      }
  gdk_pixbuf_save (pb, two, "png", &error, NULL);
  g_assert_no_error (error);
  g_object_unref (pb);
  write_gradient (jpg, "jpeg", 200, 120, FALSE);
  write_gradient (png, "png", 37, 53, TRUE);

  for (int channels = 1; channels <= 3; channels += 2)
    {
      DfDataset *d = df_dataset_load (dir, NULL, 4, channels, &error);
      DfDataset *d24;
      float *want = g_new (float, channels * 24 * 24);

      /* 8 x 2 stretched to 4 x 4: columns 0-1 red, 2-3 the blue on white;
       * the halves do not mix (each output column is two source ones). */
      g_assert_no_error (error);
      g_assert_cmpint (d->n, ==, 3);
      for (int y = 0; y < 4; y++)
        for (int x = 0; x < 4; x++)
          {
            const double *c = rgb[x >= 2];

            if (channels == 1)
              worst = MAX (worst, fabs (d->images[y * 4 + x]
                                        - ((0.299 * c[0] + 0.587 * c[1]
                                            + 0.114 * c[2]) * 2 - 1)));
            else
              for (int k = 0; k < 3; k++)
                worst = MAX (worst, fabs (d->images[(k * 4 + y) * 4 + x]
                                          - (c[k] * 2 - 1)));
          }
      df_dataset_free (d);

      /* The gradients at 24 x 24, exactly as before. */
      d24 = df_dataset_load (dir, NULL, 24, channels, &error);
      g_assert_no_error (error);
      for (int i = 1; i < 3; i++)
        {
          const float *got = d24->images + (gsize) i * channels * 24 * 24;

          reference_pixels (i == 1 ? jpg : png, 24, channels, want);
          for (int k = 0; k < channels * 24 * 24; k++)
            g_assert_cmpfloat (got[k], ==, want[k]);
        }
      df_dataset_free (d24);
      g_free (want);
    }
  g_test_message ("worst difference from the hand values %g", worst);
  g_assert_cmpfloat (worst, <=, 1e-6);

  rm_rf (dir);
  g_free (cls);
  g_free (two);
  g_free (jpg);
  g_free (png);
  g_free (dir);
}

/* ---- folder layout ---- */

/* square/more/x.png was skipped: images in a class folder's subfolders
 * belong to the class; hidden ones stay out. */
static void
test_folder_nested (void)
{
  char *dir = make_tmp ("df-nested-XXXXXX");
  const char *paths[] = { "circle/b.png", "square/a.png",
                          "square/more/deeper/y.png", "square/more/x.png" };
  const char *hidden[] = { "circle/.h.png", "square/.cache/z.png",
                           "square/more/.z.png" };
  GError *error = NULL;
  DfDataset *d;

  for (int i = 0; i < 4 + 3; i++)
    {
      char *p = g_build_filename (dir, i < 4 ? paths[i] : hidden[i - 4],
                                  NULL);
      char *parent = g_path_get_dirname (p);

      g_assert_cmpint (g_mkdir_with_parents (parent, 0755), ==, 0);
      write_png (p, 4, 4, 40 * i, 40 * i, 40 * i, -1);
      g_free (parent);
      g_free (p);
    }

  d = df_dataset_load (dir, NULL, 4, 1, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->n, ==, 4);
  g_assert_cmpint (d->num_classes, ==, 2);
  g_assert_cmpstr (d->class_names[0], ==, "circle");
  g_assert_cmpstr (d->class_names[1], ==, "square");
  g_assert_null (d->class_names[2]);
  g_assert_cmpint (d->labels[0], ==, 0);
  for (int i = 1; i < 4; i++)
    g_assert_cmpint (d->labels[i], ==, 1);

  /* In path order within the class, each its own gray 40 i. */
  for (int i = 0; i < 4; i++)
    g_assert_cmpfloat (fabs (d->images[i * 16 + 5] - (40 * i / 127.5 - 1)),
                       <=, 1e-5);
  df_dataset_free (d);

  rm_rf (dir);
  g_free (dir);
}

/* A folder that links back to one above it would be read forever. */
static void
test_folder_link_loop (void)
{
  char *dir = make_tmp ("df-loop-XXXXXX");
  char *sub = g_build_filename (dir, "cls", "sub", NULL);
  char *p = g_build_filename (dir, "cls", "a.png", NULL);
  char *link = g_build_filename (sub, "back", NULL);
  GError *error = NULL;
  DfDataset *d;

  g_assert_cmpint (g_mkdir_with_parents (sub, 0755), ==, 0);
  write_png (p, 4, 4, 1, 2, 3, -1);
  g_assert_cmpint (symlink ("..", link), ==, 0);

  d = df_dataset_load (dir, NULL, 4, 1, &error);
  g_assert_null (d);
  g_assert_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT);
  g_test_message ("%s", error->message);
  g_assert_true (g_str_has_prefix (error->message, link));
  g_assert_nonnull (strstr (error->message, "loop"));
  g_clear_error (&error);

  /* rm_rf would follow the link. */
  g_assert_cmpint (g_remove (link), ==, 0);
  rm_rf (dir);
  g_free (sub);
  g_free (p);
  g_free (link);
  g_free (dir);
}

/* Images beside the class folders were skipped: they are in no class. */
static void
test_folder_beside_classes (void)
{
  char *dir = make_tmp ("df-beside-XXXXXX");
  char *cls = g_build_filename (dir, "cls", NULL);
  char *stray = g_build_filename (dir, "b-stray.jpg", NULL);
  char *p;
  GError *error = NULL;
  DfDataset *d;

  g_mkdir (cls, 0755);
  p = g_build_filename (cls, "a.png", NULL);
  write_png (p, 4, 4, 1, 2, 3, -1);
  g_free (p);
  write_gradient (stray, "jpeg", 8, 8, FALSE);
  p = g_build_filename (dir, "c-stray.png", NULL);
  write_png (p, 4, 4, 1, 2, 3, -1);
  g_free (p);

  /* Neither hidden files nor files that are not images count. */
  p = g_build_filename (dir, ".a-hidden.png", NULL);
  write_png (p, 4, 4, 1, 2, 3, -1);
  g_free (p);
  p = g_build_filename (dir, "a-notes.txt", NULL);
  g_file_set_contents (p, "not an image", -1, NULL);
  g_free (p);

  d = df_dataset_load (dir, NULL, 4, 1, &error);
  g_assert_null (d);
  g_assert_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT);
  g_test_message ("%s", error->message);
  g_assert_true (g_str_has_prefix (error->message, stray));
  g_assert_nonnull (strstr (error->message, "move it into a class folder"));
  g_assert_null (strstr (error->message, "c-stray.png"));
  g_clear_error (&error);

  /* Moved away, the rest loads as one class. */
  g_remove (stray);
  p = g_build_filename (dir, "c-stray.png", NULL);
  g_remove (p);
  g_free (p);
  d = df_dataset_load (dir, NULL, 4, 1, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->n, ==, 1);
  g_assert_cmpint (d->num_classes, ==, 1);
  g_assert_cmpstr (d->class_names[0], ==, "cls");
  df_dataset_free (d);

  rm_rf (dir);
  g_free (cls);
  g_free (stray);
  g_free (dir);
}

/* A hidden subfolder does not make a folder of images a class folder: it
 * stays one class named after the folder. */
static void
test_folder_flat_hidden_subfolder (void)
{
  char *dir = make_tmp ("df-flat-XXXXXX");
  char *base = g_path_get_basename (dir);
  char *hid = g_build_filename (dir, ".thumbnails", NULL);
  char *p;
  GError *error = NULL;
  DfDataset *d;

  g_mkdir (hid, 0755);
  p = g_build_filename (hid, "t.png", NULL);
  write_png (p, 4, 4, 1, 2, 3, -1);
  g_free (p);
  for (int i = 0; i < 2; i++)
    {
      p = g_strdup_printf ("%s/%d.png", dir, i);
      write_png (p, 4, 4, 9, 9, 9, -1);
      g_free (p);
    }
  d = df_dataset_load (dir, NULL, 4, 1, &error);
  g_assert_no_error (error);
  g_assert_cmpint (d->n, ==, 2);
  g_assert_cmpint (d->num_classes, ==, 1);
  g_assert_cmpstr (d->class_names[0], ==, base);
  df_dataset_free (d);

  rm_rf (dir);
  g_free (base);
  g_free (hid);
  g_free (dir);
}

/* ---- channels ---- */

/* A model with 4 input channels ended in a critical warning and "unknown
 * error": now an error saying what images can give. */
static void
test_channels_unsupported (void)
{
  char *dir = make_tmp ("df-channels-XXXXXX");
  char *cls = g_build_filename (dir, "cls", NULL);
  char *idx = g_build_filename (dir, "idx", NULL);
  char *p = g_build_filename (cls, "a.png", NULL);
  const char *want = "the model has 4 image channels; images can be read "
                     "as 1 (gray) or 3 (RGB)";
  GError *error = NULL;

  g_mkdir (cls, 0755);
  g_mkdir (idx, 0755);
  write_png (p, 4, 4, 1, 2, 3, -1);
  g_free (write_file (idx, "train-images-idx3-ubyte",
                      idx_images (0x803, 2, 4, 4), -1, FALSE));
  g_free (write_file (idx, "train-labels-idx1-ubyte", idx_labels (0x801, 2),
                      -1, FALSE));

  g_assert_null (df_dataset_load (dir, NULL, 4, 4, &error));
  g_assert_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_CHANNELS);
  g_assert_cmpstr (error->message, ==, want);
  g_clear_error (&error);
  g_assert_null (df_dataset_load (idx, "train", 4, 4, &error));
  g_assert_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_CHANNELS);
  g_assert_cmpstr (error->message, ==, want);
  g_clear_error (&error);
  g_assert_null (df_dataset_load_folder (dir, 4, 2, &error));
  g_assert_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_CHANNELS);
  g_assert_cmpstr (error->message, ==, "the model has 2 image channels; "
                   "images can be read as 1 (gray) or 3 (RGB)");
  g_clear_error (&error);

  rm_rf (dir);
  g_free (cls);
  g_free (idx);
  g_free (p);
  g_free (dir);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/engine/dataset/idx-gzip-values", test_idx_gz);
  g_test_add_func ("/engine/dataset/idx-plain-values", test_idx_plain);
  g_test_add_func ("/engine/dataset/idx-resize-bilinear", test_idx_resize);
  g_test_add_func ("/engine/dataset/idx-wrong-magic", test_idx_wrong_magic);
  g_test_add_func ("/engine/dataset/idx-truncated", test_idx_truncated);
  g_test_add_func ("/engine/dataset/idx-count-mismatch",
                   test_idx_count_mismatch);
  g_test_add_func ("/engine/dataset/idx-missing-file", test_idx_missing);
  g_test_add_func ("/engine/dataset/idx-folder-fashion-names",
                   test_idx_folder_fashion);
  g_test_add_func ("/engine/dataset/idx-real-fashion-mnist",
                   test_idx_real_fashion);
  g_test_add_func ("/engine/dataset/folder-classes", test_folder_classes);
  g_test_add_func ("/engine/dataset/folder-flat-one-class", test_folder_flat);
  g_test_add_func ("/engine/dataset/folder-unreadable-image",
                   test_folder_unreadable);
  g_test_add_func ("/engine/dataset/folder-empty", test_folder_empty);
  g_test_add_func ("/engine/dataset/folder-empty-class-folder",
                   test_folder_empty_class);
  g_test_add_func ("/engine/dataset/folder-truncated-png",
                   test_folder_truncated_png);
  g_test_add_func ("/engine/dataset/folder-truncated-jpeg",
                   test_folder_truncated_jpeg);
  g_test_add_func ("/engine/dataset/folder-valid-pixels-unchanged",
                   test_folder_valid_pixels);
  g_test_add_func ("/engine/dataset/folder-nested-into-class",
                   test_folder_nested);
  g_test_add_func ("/engine/dataset/folder-link-loop", test_folder_link_loop);
  g_test_add_func ("/engine/dataset/folder-image-beside-classes",
                   test_folder_beside_classes);
  g_test_add_func ("/engine/dataset/folder-flat-hidden-subfolder",
                   test_folder_flat_hidden_subfolder);
  g_test_add_func ("/engine/dataset/channels-unsupported",
                   test_channels_unsupported);
  return g_test_run ();
}
