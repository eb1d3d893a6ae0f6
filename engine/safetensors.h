/* safetensors.h: reading and writing the safetensors format.
 *
 * File: u64 little-endian header length, a JSON header mapping tensor names
 * to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to
 * the byte after the header) plus an optional "__metadata__" string map,
 * then the data.  Files are mapped with GMappedFile; every offset, shape and
 * byte count is checked when the file is opened.
 */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

#define DF_SAFETENSORS_ERROR (df_safetensors_error_quark ())
GQuark df_safetensors_error_quark (void);

typedef enum {
  DF_SAFETENSORS_ERROR_IO,
  DF_SAFETENSORS_ERROR_FORMAT,   /* malformed header, offsets or sizes */
  DF_SAFETENSORS_ERROR_DTYPE,    /* a dtype the engine cannot convert */
  DF_SAFETENSORS_ERROR_MISSING,  /* no tensor of that name */
  DF_SAFETENSORS_ERROR_SHAPE     /* the tensor has another shape */
} DfSafetensorsError;

typedef struct _DfSafetensors DfSafetensors;

DfSafetensors *df_safetensors_open          (const char *path, GError **error);
void           df_safetensors_free          (DfSafetensors *st);
const char    *df_safetensors_path          (DfSafetensors *st);
/* NULL when absent. */
const char    *df_safetensors_get_metadata  (DfSafetensors *st, const char *key);
gboolean       df_safetensors_has           (DfSafetensors *st, const char *name);
/* Tensor names in file order; free with g_strfreev. */
char         **df_safetensors_names         (DfSafetensors *st);
/* Shape of a tensor; FALSE when absent. */
gboolean       df_safetensors_shape         (DfSafetensors *st, const char *name,
                                             int *ndim, gint64 *shape /*[8]*/);
/* Copy a tensor into out as float32 (F32, F16 and BF16 convert), after
 * checking that its shape is exactly shape[0..ndim). */
gboolean       df_safetensors_read_f32      (DfSafetensors *st, const char *name,
                                             int ndim, const gint64 *shape,
                                             float *out, GError **error);

typedef struct {
  const char  *name;
  int          ndim;
  gint64       shape[8];
  const float *data;        /* written as F32 */
} DfSafetensorsEntry;

/* Write atomically (temporary file, fsync, rename).  metadata: NULL or a
 * NULL-terminated list of key, value, key, value, ... */
gboolean       df_safetensors_write         (const char *path,
                                             const char *const *metadata,
                                             const DfSafetensorsEntry *entries,
                                             int n_entries, GError **error);

G_END_DECLS
