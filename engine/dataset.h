/* dataset.h: training images with labels, in memory.
 *
 * Two sources: IDX files (MNIST's format, gzip or plain), such as
 * /usr/share/datasets/fashion-mnist, and a folder whose subfolders are
 * classes holding PNG or JPEG images (read with GdkPixbuf).
 */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

#define DF_DATASET_ERROR (df_dataset_error_quark ())
GQuark df_dataset_error_quark (void);

typedef enum {
  DF_DATASET_ERROR_IO,
  DF_DATASET_ERROR_FORMAT,
  DF_DATASET_ERROR_EMPTY,
  DF_DATASET_ERROR_CHANNELS     /* asked for other than 1 or 3 channels */
} DfDatasetError;

typedef struct {
  int     n, c, h, w;
  float  *images;        /* [N,C,H,W] in [-1, 1] */
  int    *labels;        /* [N] in [0, num_classes) */
  int     num_classes;
  char  **class_names;   /* [num_classes + 1], NULL-terminated */
} DfDataset;

/* path: an IDX folder (train-images-idx3-ubyte[.gz] and
 * train-labels-idx1-ubyte[.gz], or t10k-* with split "test"), or a class
 * folder: every subfolder a class holding the images in it and in its own
 * subfolders, none of them empty (an error names an empty one); an image
 * beside the class folders is an error; a folder without subfolders is one
 * class named after it.  Hidden files and folders are ignored.  Images are
 * stretched to size x size (bilinear), alpha composited on white, and
 * converted to channels, 1 gray or 3 RGB (anything else is an error,
 * DF_DATASET_ERROR_CHANNELS); an unreadable or truncated image is an error
 * naming it.  Fashion-MNIST folders get its class names. */
DfDataset *df_dataset_load       (const char *path, const char *split,
                                  int size, int channels, GError **error);
DfDataset *df_dataset_load_idx   (const char *images, const char *labels,
                                  int size, GError **error);
DfDataset *df_dataset_load_folder(const char *dir, int size, int channels,
                                  GError **error);
void       df_dataset_free       (DfDataset *d);

G_END_DECLS
