/* dataset.c: IDX files and class folders, loaded into memory as floats.
 *
 * Legend: N images, C channels, H, W size after resizing, R, S the source
 * rows and columns.
 */
#include "dataset.h"

#include <errno.h>
#include <gdk-pixbuf/gdk-pixbuf.h>
#include <glib/gstdio.h>
#include <string.h>
#include <zlib.h>

#define IDX_IMAGES_MAGIC 0x00000803u
#define IDX_LABELS_MAGIC 0x00000801u
/* Larger than any real data set, small enough that N*R*S cannot overflow. */
#define IDX_MAX_DIM      65536u
#define IDX_MAX_BYTES    ((guint64) 1 << 34)

static const char *const fashion_names[] = {
  "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot", NULL
};

G_DEFINE_QUARK (df-dataset-error-quark, df_dataset_error)

void
df_dataset_free (DfDataset *d)
{
  if (d == NULL)
    return;
  g_free (d->images);
  g_free (d->labels);
  g_strfreev (d->class_names);
  g_free (d);
}

/* ---- resizing ---- */

/* Bilinear with pixel centres aligned (PyTorch's align_corners=False):
 * src [R,S] -> dst [H,W], one channel. */
static void
resize_bilinear (const float *src, int rows, int cols, float *dst, int h,
                 int w)
{
  double sy = (double) rows / h, sx = (double) cols / w;

  for (int y = 0; y < h; y++)
    {
      double fy = MAX ((y + 0.5) * sy - 0.5, 0.0);
      int y0 = MIN ((int) fy, rows - 1), y1 = MIN (y0 + 1, rows - 1);
      float ay = (float) (fy - y0);

      for (int x = 0; x < w; x++)
        {
          double fx = MAX ((x + 0.5) * sx - 0.5, 0.0);
          int x0 = MIN ((int) fx, cols - 1), x1 = MIN (x0 + 1, cols - 1);
          float ax = (float) (fx - x0);
          float top = src[y0 * cols + x0] * (1 - ax) + src[y0 * cols + x1] * ax;
          float bot = src[y1 * cols + x0] * (1 - ax) + src[y1 * cols + x1] * ax;

          dst[y * w + x] = top * (1 - ay) + bot * ay;
        }
    }
}

/* ---- IDX ---- */

/* Read exactly len bytes, or say why not (truncated, corrupt gzip). */
static gboolean
gz_read_all (gzFile f, void *buf, gsize len, const char *path,
             const char *what, GError **error)
{
  guint8 *p = buf;

  while (len > 0)
    {
      unsigned chunk = (unsigned) MIN (len, (gsize) 1 << 30);
      int got = gzread (f, p, chunk);

      if (got < 0)
        {
          int errnum;
          const char *msg = gzerror (f, &errnum);

          g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                       "%s: cannot read %s: %s (the file is damaged; "
                       "download it again)", path, what, msg);
          return FALSE;
        }
      if (got == 0)
        {
          g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                       "%s: the file is truncated while reading %s "
                       "(download it again)", path, what);
          return FALSE;
        }
      p += got;
      len -= got;
    }
  return TRUE;
}

static guint32
be32 (const guint8 *b)
{
  return ((guint32) b[0] << 24) | ((guint32) b[1] << 16)
         | ((guint32) b[2] << 8) | b[3];
}

/* One IDX file: magic, then ndim big-endian u32 sizes, then u8 data.
 * dims[ndim] gets the sizes; *data the bytes (free with g_free). */
static gboolean
idx_read (const char *path, guint32 magic, int ndim, guint32 *dims,
          guint8 **data, GError **error)
{
  gzFile f;
  guint8 head[16];
  guint64 bytes = 1;
  gboolean ok = FALSE;

  *data = NULL;
  errno = 0;
  f = gzopen (path, "rb");
  if (f == NULL)
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_IO,
                   "%s: cannot open: %s", path,
                   errno ? g_strerror (errno) : "out of memory");
      return FALSE;
    }
  gzbuffer (f, 1 << 17);

  /* Header: the magic says the element type (08: u8) and the rank. */
  if (!gz_read_all (f, head, 4, path, "the header", error))
    goto out;
  if (be32 (head) != magic)
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                   "%s: not an IDX %s file (magic 0x%08x, expected 0x%08x); "
                   "give the %s file", path,
                   magic == IDX_IMAGES_MAGIC ? "images" : "labels",
                   be32 (head), magic,
                   magic == IDX_IMAGES_MAGIC ? "*-images-idx3-ubyte[.gz]"
                                             : "*-labels-idx1-ubyte[.gz]");
      goto out;
    }
  if (!gz_read_all (f, head + 4, 4 * ndim, path, "the header", error))
    goto out;
  for (int i = 0; i < ndim; i++)
    {
      dims[i] = be32 (head + 4 + 4 * i);
      if (dims[i] == 0 || (i > 0 && dims[i] > IDX_MAX_DIM)
          || dims[i] > ((guint32) 1 << 31) - 1)
        {
          g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                       "%s: dimension %d is %u, out of range", path, i,
                       dims[i]);
          goto out;
        }
      bytes *= dims[i];
      if (bytes > IDX_MAX_BYTES)
        {
          g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                       "%s: %s bytes of data is more than the engine loads",
                       path, "over 16 G");
          goto out;
        }
    }

  /* Body. */
  *data = g_try_malloc (bytes);
  if (*data == NULL)
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_IO,
                   "%s: out of memory for %" G_GUINT64_FORMAT " bytes", path,
                   bytes);
      goto out;
    }
  if (!gz_read_all (f, *data, bytes, path, "the data", error))
    goto out;
  ok = TRUE;

out:
  gzclose (f);
  if (!ok)
    g_clear_pointer (data, g_free);
  return ok;
}

/* The class names: Fashion-MNIST's when the path says so, else digits. */
static char **
idx_class_names (const char *images, int num_classes)
{
  char *lower = g_ascii_strdown (images, -1);
  gboolean fashion = strstr (lower, "fashion") != NULL && num_classes == 10;
  char **names = g_new0 (char *, num_classes + 1);

  for (int i = 0; i < num_classes; i++)
    names[i] = fashion ? g_strdup (fashion_names[i])
                       : g_strdup_printf ("%d", i);
  g_free (lower);
  return names;
}

DfDataset *
df_dataset_load_idx (const char *images, const char *labels, int size,
                     GError **error)
{
  guint32 idims[3], ldims[1];
  guint8 *pix = NULL, *lab = NULL;
  DfDataset *d = NULL;
  int rows, cols, max_label = 0;

  g_return_val_if_fail (images != NULL && labels != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  /* Both files, checked against each other before any conversion. */
  if (!idx_read (images, IDX_IMAGES_MAGIC, 3, idims, &pix, error)
      || !idx_read (labels, IDX_LABELS_MAGIC, 1, ldims, &lab, error))
    goto out;
  if (idims[0] != ldims[0])
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                   "%s holds %u images but %s holds %u labels; give the "
                   "labels file of the same split", images, idims[0], labels,
                   ldims[0]);
      goto out;
    }
  for (guint32 i = 0; i < ldims[0]; i++)
    max_label = MAX (max_label, lab[i]);

  /* [N,1,H,W] in [-1, 1]: u8 / 127.5 - 1, resized when asked. */
  rows = idims[1];
  cols = idims[2];
  d = g_new0 (DfDataset, 1);
  d->n = idims[0];
  d->c = 1;
  d->h = size > 0 ? size : rows;
  d->w = size > 0 ? size : cols;
  d->images = g_try_new (float, (gsize) d->n * d->h * d->w);
  d->labels = g_new (int, d->n);
  if (d->images == NULL)
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_IO,
                   "%s: out of memory for %d images of %d x %d", images,
                   d->n, d->h, d->w);
      g_clear_pointer (&d, df_dataset_free);
      goto out;
    }
#pragma omp parallel for schedule(static)
  for (int i = 0; i < d->n; i++)
    {
      const guint8 *src = pix + (gsize) i * rows * cols;
      float *dst = d->images + (gsize) i * d->h * d->w;

      if (d->h == rows && d->w == cols)
        for (int k = 0; k < rows * cols; k++)
          dst[k] = src[k] / 127.5f - 1.0f;
      else
        {
          float *tmp = g_new (float, rows * cols);   /* [R,S] */

          for (int k = 0; k < rows * cols; k++)
            tmp[k] = src[k] / 127.5f - 1.0f;
          resize_bilinear (tmp, rows, cols, dst, d->h, d->w);
          g_free (tmp);
        }
      d->labels[i] = lab[i];
    }
  d->num_classes = MAX (10, max_label + 1);
  d->class_names = idx_class_names (images, d->num_classes);

out:
  g_free (pix);
  g_free (lab);
  return d;
}

/* Gray to [N,3,H,W] by replication (IDX is gray, a model may be RGB). */
static void
dataset_to_rgb (DfDataset *d)
{
  gsize plane = (gsize) d->h * d->w;
  float *rgb = g_new (float, (gsize) d->n * 3 * plane);

#pragma omp parallel for schedule(static)
  for (int i = 0; i < d->n; i++)
    for (int c = 0; c < 3; c++)
      memcpy (rgb + ((gsize) i * 3 + c) * plane, d->images + i * plane,
              plane * sizeof (float));
  g_free (d->images);
  d->images = rgb;
  d->c = 3;
}

/* Images give 1 or 3 channels; a model config can ask for any count. */
static gboolean
check_channels (int channels, GError **error)
{
  if (channels == 1 || channels == 3)
    return TRUE;
  g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_CHANNELS,
               "the model has %d image channels; images can be read as 1 "
               "(gray) or 3 (RGB)", channels);
  return FALSE;
}

/* ---- folders ---- */

static gboolean
is_image_name (const char *name)
{
  char *lower = g_ascii_strdown (name, -1);
  gboolean yes = g_str_has_suffix (lower, ".png")
                 || g_str_has_suffix (lower, ".jpg")
                 || g_str_has_suffix (lower, ".jpeg");

  g_free (lower);
  return yes;
}

static int
compare_strings (gconstpointer a, gconstpointer b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

/* Entries of dir, sorted by name: subfolders into dirs, images into files
 * (full paths).  Hidden entries are skipped. */
static gboolean
list_folder (const char *dir, GPtrArray *dirs, GPtrArray *files,
             GError **error)
{
  GError *err = NULL;
  GDir *gd = g_dir_open (dir, 0, &err);
  const char *name;

  if (gd == NULL)
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_IO,
                   "%s: cannot open the folder: %s", dir, err->message);
      g_error_free (err);
      return FALSE;
    }
  while ((name = g_dir_read_name (gd)) != NULL)
    {
      char *path;

      if (name[0] == '.')
        continue;
      path = g_build_filename (dir, name, NULL);
      if (dirs != NULL && g_file_test (path, G_FILE_TEST_IS_DIR))
        g_ptr_array_add (dirs, path);
      else if (files != NULL && is_image_name (name)
               && g_file_test (path, G_FILE_TEST_IS_REGULAR))
        g_ptr_array_add (files, path);
      else
        g_free (path);
    }
  g_dir_close (gd);
  if (dirs != NULL)
    g_ptr_array_sort (dirs, compare_strings);
  if (files != NULL)
    g_ptr_array_sort (files, compare_strings);
  return TRUE;
}

/* A folder's device and inode, to find a link back to a folder above. */
typedef struct {
  guint64 dev, ino;
} FolderId;

/* Every image in dir and its subfolders, at any depth, into files (full
 * paths; sorting is the caller's).  above: the folders dir is inside. */
static gboolean
list_images_under (const char *dir, GArray *above, GPtrArray *files,
                   GError **error)
{
  GPtrArray *dirs;
  GStatBuf st;
  gboolean ok, pushed = FALSE;

  /* A link to a folder above would be read forever.  (If dir cannot be
   * statted, list_folder says why.) */
  if (g_stat (dir, &st) == 0)
    {
      FolderId id = { st.st_dev, st.st_ino };

      for (guint i = 0; i < above->len; i++)
        if (g_array_index (above, FolderId, i).dev == id.dev
            && g_array_index (above, FolderId, i).ino == id.ino)
          {
            g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                         "%s: a link to a folder that holds it, a loop "
                         "(remove the link)", dir);
            return FALSE;
          }
      g_array_append_val (above, id);
      pushed = TRUE;
    }

  dirs = g_ptr_array_new_with_free_func (g_free);
  ok = list_folder (dir, dirs, files, error);
  for (guint k = 0; ok && k < dirs->len; k++)
    ok = list_images_under (dirs->pdata[k], above, files, error);
  g_ptr_array_unref (dirs);
  if (pushed)
    g_array_set_size (above, above->len - 1);
  return ok;
}

/* The loaders finish a PNG or JPEG that stops early with the rows they have
 * (gray or garbage below) and no error, so completeness is checked here: a
 * whole file reaches its PNG IEND chunk or JPEG EOI marker.  NULL if it
 * does (or is another format), else the end it lacks. */
static const char *
image_cut_short (const guint8 *b, gsize len)
{
  static const guint8 png_signature[8] = { 0x89, 'P', 'N', 'G',
                                           '\r', '\n', 0x1a, '\n' };

  if (len >= 8 && memcmp (b, png_signature, 8) == 0)
    {
      /* Chunks: u32 length, 4-byte type, data, u32 CRC. */
      gsize pos = 8;

      while (len - pos >= 12)
        {
          guint64 end = pos + 12 + (guint64) be32 (b + pos);

          if (end > len)
            break;
          if (memcmp (b + pos + 4, "IEND", 4) == 0)
            return NULL;
          pos = end;
        }
      return "PNG data (its IEND chunk)";
    }
  if (len >= 3 && b[0] == 0xff && b[1] == 0xd8 && b[2] == 0xff)
    {
      /* Markers FF xx.  Segments with a u16 length are skipped whole (tables
       * and EXIF thumbnails hold any bytes); in the entropy-coded data after
       * a scan header FF is followed by 00 (stuffed) or a restart marker. */
      gsize pos = 2;

      while (pos + 1 < len)
        {
          guint8 m = b[pos + 1];

          if (b[pos] != 0xff || m == 0xff)
            pos++;
          else if (m == 0xd9)
            return NULL;
          else if (m == 0x00 || m == 0x01 || (m >= 0xd0 && m <= 0xd8))
            pos += 2;
          else if (len - pos < 4)
            break;
          else
            pos += 2 + (((gsize) b[pos + 2] << 8) | b[pos + 3]);
        }
      return "JPEG data (its EOI marker)";
    }
  return NULL;
}

/* The loader's size-prepared: decode stretched to w x h (JPEG decodes at a
 * reduced size on the way), as gdk_pixbuf_new_from_file_at_scale does
 * without preserve_aspect_ratio. */
static void
on_size_prepared (GdkPixbufLoader *loader, int width, int height,
                  gpointer data)
{
  const int *wh = data;

  gdk_pixbuf_loader_set_size (loader, wh[0], wh[1]);
}

/* Fed in the pieces gdk_pixbuf_new_from_file_at_scale uses, a progressive
 * JPEG goes through the same passes and so keeps its pixels. */
#define LOAD_PIECE 65536

/* One image file -> a pixbuf of about w x h, or an error naming the file. */
static GdkPixbuf *
decode_image (const char *path, int w, int h, GError **error)
{
  GError *err = NULL;
  GdkPixbufLoader *loader;
  GdkPixbuf *pb = NULL;
  const char *lacks;
  int wh[2] = { w, h };
  char *bytes;
  gsize len;
  gboolean ok = TRUE;

  if (!g_file_get_contents (path, &bytes, &len, &err))
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_IO,
                   "%s: cannot read the image: %s (remove or replace it)",
                   path, err->message);
      g_error_free (err);
      return NULL;
    }
  if (len == 0)
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                   "%s: cannot read the image: the file is empty (remove or "
                   "replace it)", path);
      g_free (bytes);
      return NULL;
    }
  lacks = image_cut_short ((const guint8 *) bytes, len);
  if (lacks != NULL)
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                   "%s: cannot read the image: the file stops before the end "
                   "of its %s, truncated or damaged (remove or replace it)",
                   path, lacks);
      g_free (bytes);
      return NULL;
    }

  /* Write and close both report bad data; a pixbuf can still be missing. */
  loader = gdk_pixbuf_loader_new ();
  g_signal_connect (loader, "size-prepared", G_CALLBACK (on_size_prepared),
                    wh);
  for (gsize off = 0; ok && off < len; off += LOAD_PIECE)
    ok = gdk_pixbuf_loader_write (loader, (const guchar *) bytes + off,
                                  MIN (len - off, LOAD_PIECE), &err);
  if (!ok)
    gdk_pixbuf_loader_close (loader, NULL);
  else if (gdk_pixbuf_loader_close (loader, &err))
    {
      pb = gdk_pixbuf_loader_get_pixbuf (loader);
      if (pb != NULL)
        g_object_ref (pb);
      else
        g_set_error_literal (&err, GDK_PIXBUF_ERROR, GDK_PIXBUF_ERROR_FAILED,
                             "no image in it");
    }
  g_object_unref (loader);
  g_free (bytes);
  if (pb == NULL)
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                   "%s: cannot read the image: %s (remove or replace it)",
                   path, err ? err->message : "the decoder gave no reason");
      g_clear_error (&err);
    }
  return pb;
}

/* One image file -> dst [C,H,W] in [-1, 1], alpha composited on white. */
static gboolean
load_image (const char *path, int h, int w, int channels, float *dst,
            GError **error)
{
  GdkPixbuf *pb = decode_image (path, w, h, error);
  const guint8 *px;
  int stride, nch;
  gboolean alpha;
  gsize plane = (gsize) h * w;

  if (pb == NULL)
    return FALSE;

  /* The loader may hand back another size when it cannot scale. */
  if (gdk_pixbuf_get_width (pb) != w || gdk_pixbuf_get_height (pb) != h)
    {
      GdkPixbuf *scaled = gdk_pixbuf_scale_simple (pb, w, h,
                                                   GDK_INTERP_BILINEAR);
      g_object_unref (pb);
      pb = scaled;
    }
  px = gdk_pixbuf_read_pixels (pb);
  stride = gdk_pixbuf_get_rowstride (pb);
  nch = gdk_pixbuf_get_n_channels (pb);
  alpha = gdk_pixbuf_get_has_alpha (pb);

  for (int y = 0; y < h; y++)
    for (int x = 0; x < w; x++)
      {
        const guint8 *p = px + (gsize) y * stride + (gsize) x * nch;
        float a = alpha ? p[nch - 1] / 255.0f : 1.0f;
        float rgb[3];

        /* Gray pixbufs do not exist in GdkPixbuf: nch is 3 or 4. */
        for (int c = 0; c < 3; c++)
          rgb[c] = (p[c] / 255.0f) * a + (1.0f - a);
        if (channels == 1)
          dst[y * w + x] = (0.299f * rgb[0] + 0.587f * rgb[1]
                            + 0.114f * rgb[2]) * 2.0f - 1.0f;
        else
          for (int c = 0; c < 3; c++)
            dst[c * plane + y * w + x] = rgb[c] * 2.0f - 1.0f;
      }
  g_object_unref (pb);
  return TRUE;
}

DfDataset *
df_dataset_load_folder (const char *dir, int size, int channels,
                        GError **error)
{
  GPtrArray *dirs = g_ptr_array_new_with_free_func (g_free);
  GPtrArray *files = g_ptr_array_new_with_free_func (g_free);
  GPtrArray *names = g_ptr_array_new ();
  GArray *labels = g_array_new (FALSE, FALSE, sizeof (int));
  DfDataset *d = NULL;
  gsize per;
  GError *first_error = NULL;
  int first_bad = -1;

  g_return_val_if_fail (dir != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  if (!check_channels (channels, error))
    goto out;

  /* Classes: the subfolders in name order, or the folder itself. */
  if (!list_folder (dir, dirs, files, error))
    goto out;
  if (dirs->len == 0)
    {
      g_ptr_array_add (names, g_path_get_basename (dir));
      for (guint i = 0; i < files->len; i++)
        {
          int zero = 0;
          g_array_append_val (labels, zero);
        }
    }
  else if (files->len > 0)
    {
      /* It would be in no class; skipping it hides a misplaced image. */
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                   "%s: an image beside the class folders (every subfolder "
                   "of %s is a class): move it into a class folder",
                   (char *) files->pdata[0], dir);
      goto out;
    }
  else
    for (guint k = 0; k < dirs->len; k++)
      {
        GArray *above = g_array_new (FALSE, FALSE, sizeof (FolderId));
        guint before = files->len;
        int label = names->len;
        gboolean ok;

        /* The class's images at any depth, in path order. */
        ok = list_images_under (dirs->pdata[k], above, files, error);
        g_array_free (above, TRUE);
        if (!ok)
          goto out;
        if (files->len == before)
          {
            /* Skipping it would renumber the classes after it and leave a
             * class the user asked for untrained. */
            g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_EMPTY,
                         "%s: no PNG or JPEG images in this class folder "
                         "(every subfolder of %s is a class): add its "
                         "images or move it out", (char *) dirs->pdata[k],
                         dir);
            goto out;
          }
        qsort (files->pdata + before, files->len - before, sizeof (char *),
               compare_strings);
        g_ptr_array_add (names, g_path_get_basename (dirs->pdata[k]));
        for (guint i = before; i < files->len; i++)
          g_array_append_val (labels, label);
      }
  if (files->len == 0)
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_EMPTY,
                   "%s: no PNG or JPEG images, neither in the folder nor in "
                   "its subfolders (one subfolder per class)", dir);
      goto out;
    }

  /* Size: asked for, or the first image's. */
  if (size <= 0)
    {
      int w, h;

      if (gdk_pixbuf_get_file_info (files->pdata[0], &w, &h) == NULL)
        {
          g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_FORMAT,
                       "%s: cannot read the image (remove or replace it)",
                       (char *) files->pdata[0]);
          goto out;
        }
      size = MAX (w, h);
    }

  /* Images [N,C,H,W]; decoding is the slow part, so in parallel. */
  d = g_new0 (DfDataset, 1);
  d->n = files->len;
  d->c = channels;
  d->h = d->w = size;
  per = (gsize) channels * size * size;
  d->images = g_try_new (float, per * d->n);
  if (d->images == NULL)
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_IO,
                   "%s: out of memory for %d images of %d x %d", dir, d->n,
                   size, size);
      g_clear_pointer (&d, df_dataset_free);
      goto out;
    }
  d->labels = (int *) g_array_free (labels, FALSE);
  labels = NULL;

  /* The first image alone (loaders initialise themselves on first use),
   * then the rest in parallel; report the first bad file in name order. */
  if (!load_image (files->pdata[0], size, size, channels, d->images,
                   &first_error))
    first_bad = 0;
#pragma omp parallel for schedule(dynamic, 16)
  for (int i = 1; i < d->n; i++)
    {
      GError *err = NULL;

      if (!load_image (files->pdata[i], size, size, channels,
                       d->images + per * i, &err))
#pragma omp critical (df_dataset_error)
        {
          if (first_error == NULL || i < first_bad)
            {
              g_clear_error (&first_error);
              first_error = err;
              first_bad = i;
            }
          else
            g_error_free (err);
        }
    }
  if (first_error != NULL)
    {
      g_propagate_error (error, first_error);
      g_clear_pointer (&d, df_dataset_free);
      goto out;
    }
  d->num_classes = names->len;
  g_ptr_array_add (names, NULL);
  d->class_names = (char **) g_ptr_array_free (names, FALSE);
  names = NULL;

out:
  g_ptr_array_unref (dirs);
  g_ptr_array_unref (files);
  if (names != NULL)
    {
      g_ptr_array_set_free_func (names, g_free);
      g_ptr_array_unref (names);
    }
  if (labels != NULL)
    g_array_free (labels, TRUE);
  return d;
}

/* ---- either ---- */

/* dir/prefix-kind-idxN-ubyte or the .gz beside it; NULL if neither. */
static char *
find_idx (const char *dir, const char *prefix, const char *kind)
{
  char *base = g_strdup_printf ("%s-%s-ubyte", prefix, kind);
  char *plain = g_build_filename (dir, base, NULL);
  char *gz = g_strconcat (plain, ".gz", NULL);
  char *found = NULL;

  if (g_file_test (gz, G_FILE_TEST_IS_REGULAR))
    found = g_steal_pointer (&gz);
  else if (g_file_test (plain, G_FILE_TEST_IS_REGULAR))
    found = g_steal_pointer (&plain);
  g_free (base);
  g_free (plain);
  g_free (gz);
  return found;
}

DfDataset *
df_dataset_load (const char *path, const char *split, int size, int channels,
                 GError **error)
{
  const char *prefix;
  char *images, *labels;
  DfDataset *d;

  g_return_val_if_fail (path != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  /* The callers pass the model's in_channels, which a config can set. */
  if (!check_channels (channels, error))
    return NULL;
  if (!g_file_test (path, G_FILE_TEST_IS_DIR))
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_IO,
                   "%s: not a folder (give a folder of IDX files, or of "
                   "class subfolders of images)", path);
      return NULL;
    }
  if (split == NULL || strcmp (split, "train") == 0)
    prefix = "train";
  else if (strcmp (split, "test") == 0 || strcmp (split, "t10k") == 0)
    prefix = "t10k";
  else
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_IO,
                   "unknown split \"%s\" (use train or test)", split);
      return NULL;
    }

  /* IDX when the images file is there; its labels must be there too. */
  images = find_idx (path, prefix, "images-idx3");
  if (images == NULL)
    return df_dataset_load_folder (path, size, channels, error);
  labels = find_idx (path, prefix, "labels-idx1");
  if (labels == NULL)
    {
      g_set_error (error, DF_DATASET_ERROR, DF_DATASET_ERROR_IO,
                   "%s: no %s-labels-idx1-ubyte[.gz] beside %s", path, prefix,
                   images);
      g_free (images);
      return NULL;
    }
  d = df_dataset_load_idx (images, labels, size, error);
  if (d != NULL && channels == 3)
    dataset_to_rgb (d);
  g_free (images);
  g_free (labels);
  return d;
}
