/* safetensors.c: the safetensors reader and writer (see safetensors.h).
 *
 * The whole header is checked in df_safetensors_open(), so that the readers
 * below only index memory that is known to lie inside the mapping.
 */
#include "safetensors.h"

#include <string.h>

#include <gio/gio.h>
#include <json-glib/json-glib.h>

#define DF_ST_MAX_DIMS 8

typedef enum {
  DTYPE_F32, DTYPE_F16, DTYPE_BF16,
  /* Known but not convertible to float by the engine. */
  DTYPE_OTHER
} Dtype;

typedef struct {
  char   *name;
  char   *dtype_name;
  Dtype   dtype;
  int     dtype_size;
  int     ndim;
  gint64  shape[DF_ST_MAX_DIMS];
  guint64 begin, end;          /* relative to the data section */
} Entry;

struct _DfSafetensors {
  char        *path;
  GMappedFile *mapped;
  const guint8 *data;          /* the data section */
  guint64      data_size;
  GPtrArray   *entries;        /* Entry *, in file order */
  GHashTable  *by_name;        /* name -> Entry * */
  GHashTable  *metadata;       /* char * -> char * */
};

G_DEFINE_QUARK (df-safetensors-error-quark, df_safetensors_error)

static const struct {
  const char *name;
  Dtype       dtype;
  int         size;
} dtypes[] = {
  { "F32", DTYPE_F32, 4 }, { "F16", DTYPE_F16, 2 }, { "BF16", DTYPE_BF16, 2 },
  { "F64", DTYPE_OTHER, 8 }, { "I64", DTYPE_OTHER, 8 },
  { "U64", DTYPE_OTHER, 8 }, { "I32", DTYPE_OTHER, 4 },
  { "U32", DTYPE_OTHER, 4 }, { "I16", DTYPE_OTHER, 2 },
  { "U16", DTYPE_OTHER, 2 }, { "I8", DTYPE_OTHER, 1 },
  { "U8", DTYPE_OTHER, 1 }, { "BOOL", DTYPE_OTHER, 1 },
  { "F8_E4M3", DTYPE_OTHER, 1 }, { "F8_E5M2", DTYPE_OTHER, 1 },
};

static void
entry_free (gpointer p)
{
  Entry *e = p;

  g_free (e->name);
  g_free (e->dtype_name);
  g_free (e);
}

/* ---- half-precision conversions, exact for every input ---- */

static inline float
bits_to_float (guint32 bits)
{
  float f;

  memcpy (&f, &bits, sizeof f);
  return f;
}

static inline float
f16_to_float (guint16 h)
{
  guint32 sign = (guint32) (h & 0x8000) << 16;
  guint32 exp = (h >> 10) & 0x1f;
  guint32 mant = h & 0x3ff;

  if (exp == 0x1f)
    /* Inf, or NaN with its payload kept in the high mantissa bits. */
    return bits_to_float (sign | 0x7f800000u | (mant << 13));
  if (exp == 0)
    {
      if (mant == 0)
        return bits_to_float (sign);
      /* Subnormal: mant x 2^-24; normalise so the leading 1 is implicit. */
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0)
        {
          mant <<= 1;
          exp--;
        }
      mant &= 0x3ff;
      return bits_to_float (sign | (exp << 23) | (mant << 13));
    }
  return bits_to_float (sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

static inline float
bf16_to_float (guint16 b)
{
  return bits_to_float ((guint32) b << 16);
}

/* ---- header parsing ---- */

static gboolean
get_uint (JsonNode *node, guint64 *out)
{
  gint64 v;

  if (node == NULL || !JSON_NODE_HOLDS_VALUE (node)
      || json_node_get_value_type (node) != G_TYPE_INT64)
    return FALSE;
  v = json_node_get_int (node);
  if (v < 0)
    return FALSE;
  *out = (guint64) v;
  return TRUE;
}

static gboolean
format_error (GError **error, DfSafetensors *st, const char *tensor,
              const char *fmt, ...) G_GNUC_PRINTF (4, 5);

static gboolean
format_error (GError **error, DfSafetensors *st, const char *tensor,
              const char *fmt, ...)
{
  va_list ap;
  char *what;

  va_start (ap, fmt);
  what = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  if (tensor != NULL)
    g_set_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_FORMAT,
                 "%s: tensor \"%s\": %s; the file is damaged or not a "
                 "safetensors file", st->path, tensor, what);
  else
    g_set_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_FORMAT,
                 "%s: %s; the file is damaged or not a safetensors file",
                 st->path, what);
  g_free (what);
  return FALSE;
}

static gboolean
parse_metadata (DfSafetensors *st, JsonNode *node, GError **error)
{
  JsonObject *obj;
  GList *members, *l;
  gboolean ok = TRUE;

  if (!JSON_NODE_HOLDS_OBJECT (node))
    return format_error (error, st, NULL, "__metadata__ is not an object");
  obj = json_node_get_object (node);
  members = json_object_get_members (obj);
  for (l = members; l != NULL; l = l->next)
    {
      JsonNode *v = json_object_get_member (obj, l->data);

      if (!JSON_NODE_HOLDS_VALUE (v)
          || json_node_get_value_type (v) != G_TYPE_STRING)
        {
          ok = format_error (error, st, NULL, "__metadata__ entry \"%s\" is "
                             "not a string", (const char *) l->data);
          break;
        }
      g_hash_table_insert (st->metadata, g_strdup (l->data),
                           g_strdup (json_node_get_string (v)));
    }
  g_list_free (members);
  return ok;
}

static gboolean
parse_entry (DfSafetensors *st, const char *name, JsonNode *node,
             GError **error)
{
  JsonObject *obj;
  JsonNode *dn, *sn, *on;
  JsonArray *arr;
  const char *dname;
  Entry *e;
  guint64 count = 1, bytes;
  guint i;

  if (!JSON_NODE_HOLDS_OBJECT (node))
    return format_error (error, st, name, "the entry is not an object");
  obj = json_node_get_object (node);
  dn = json_object_get_member (obj, "dtype");
  sn = json_object_get_member (obj, "shape");
  on = json_object_get_member (obj, "data_offsets");
  if (dn == NULL || sn == NULL || on == NULL)
    return format_error (error, st, name, "the entry lacks dtype, shape or "
                         "data_offsets");

  e = g_new0 (Entry, 1);
  e->name = g_strdup (name);
  g_ptr_array_add (st->entries, e);

  /* The dtype: unknown names cannot even be size-checked. */
  if (!JSON_NODE_HOLDS_VALUE (dn)
      || json_node_get_value_type (dn) != G_TYPE_STRING)
    return format_error (error, st, name, "dtype is not a string");
  dname = json_node_get_string (dn);
  e->dtype_size = 0;
  for (i = 0; i < G_N_ELEMENTS (dtypes); i++)
    if (strcmp (dtypes[i].name, dname) == 0)
      {
        e->dtype = dtypes[i].dtype;
        e->dtype_size = dtypes[i].size;
      }
  if (e->dtype_size == 0)
    {
      g_set_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_DTYPE,
                   "%s: tensor \"%s\" has the unknown dtype \"%s\" (the "
                   "engine reads F32, F16 and BF16)", st->path, name, dname);
      return FALSE;
    }
  e->dtype_name = g_strdup (dname);

  /* The shape: at most 8 non-negative integers. */
  if (!JSON_NODE_HOLDS_ARRAY (sn))
    return format_error (error, st, name, "shape is not an array");
  arr = json_node_get_array (sn);
  if (json_array_get_length (arr) > DF_ST_MAX_DIMS)
    return format_error (error, st, name, "shape has %u dimensions (at most "
                         "%d are supported)", json_array_get_length (arr),
                         DF_ST_MAX_DIMS);
  e->ndim = json_array_get_length (arr);
  for (i = 0; i < (guint) e->ndim; i++)
    {
      guint64 d;

      if (!get_uint (json_array_get_element (arr, i), &d)
          || d > G_MAXINT64)
        return format_error (error, st, name, "shape[%u] is not a "
                             "non-negative integer", i);
      e->shape[i] = (gint64) d;
      if (!g_uint64_checked_mul (&count, count, d))
        return format_error (error, st, name, "the shape is too large");
    }

  /* The offsets: inside the data section and matching the shape. */
  if (!JSON_NODE_HOLDS_ARRAY (on)
      || json_array_get_length (json_node_get_array (on)) != 2
      || !get_uint (json_array_get_element (json_node_get_array (on), 0),
                    &e->begin)
      || !get_uint (json_array_get_element (json_node_get_array (on), 1),
                    &e->end))
    return format_error (error, st, name, "data_offsets is not a pair of "
                         "non-negative integers");
  if (e->begin > e->end)
    return format_error (error, st, name, "data_offsets [%" G_GUINT64_FORMAT
                         ", %" G_GUINT64_FORMAT "] end before they begin",
                         e->begin, e->end);
  if (e->end > st->data_size)
    return format_error (error, st, name, "data_offsets [%" G_GUINT64_FORMAT
                         ", %" G_GUINT64_FORMAT "] lie outside the data "
                         "section of %" G_GUINT64_FORMAT " bytes", e->begin,
                         e->end, st->data_size);
  if (!g_uint64_checked_mul (&bytes, count, e->dtype_size)
      || bytes != e->end - e->begin)
    return format_error (error, st, name, "%" G_GUINT64_FORMAT " elements "
                         "of %s need %" G_GUINT64_FORMAT " bytes but "
                         "data_offsets span %" G_GUINT64_FORMAT, count, dname,
                         count * e->dtype_size, e->end - e->begin);

  g_hash_table_insert (st->by_name, e->name, e);
  return TRUE;
}

static int
entry_cmp_begin (gconstpointer a, gconstpointer b)
{
  const Entry *ea = *(Entry *const *) a, *eb = *(Entry *const *) b;

  if (ea->begin != eb->begin)
    return ea->begin < eb->begin ? -1 : 1;
  return ea->end < eb->end ? -1 : ea->end > eb->end;
}

static gboolean
check_overlaps (DfSafetensors *st, GError **error)
{
  GPtrArray *sorted = g_ptr_array_new ();
  const Entry *prev = NULL;
  gboolean ok = TRUE;
  guint i;

  for (i = 0; i < st->entries->len; i++)
    {
      Entry *e = st->entries->pdata[i];

      /* An empty tensor occupies no bytes and cannot overlap. */
      if (e->end > e->begin)
        g_ptr_array_add (sorted, e);
    }
  g_ptr_array_sort (sorted, entry_cmp_begin);
  for (i = 0; i < sorted->len && ok; i++)
    {
      const Entry *e = sorted->pdata[i];

      if (prev != NULL && e->begin < prev->end)
        ok = format_error (error, st, e->name, "its bytes [%" G_GUINT64_FORMAT
                           ", %" G_GUINT64_FORMAT ") overlap those of \"%s\"",
                           e->begin, e->end, prev->name);
      prev = e;
    }
  g_ptr_array_free (sorted, TRUE);
  return ok;
}

static gboolean
parse_header (DfSafetensors *st, const char *json, gsize len, GError **error)
{
  JsonParser *parser = json_parser_new ();
  GError *local = NULL;
  JsonObject *root;
  GList *members = NULL, *l;
  gboolean ok = FALSE;

  if (!json_parser_load_from_data (parser, json, (gssize) len, &local))
    {
      format_error (error, st, NULL, "the header is not JSON (%s)",
                    local->message);
      g_error_free (local);
      goto out;
    }
  if (!JSON_NODE_HOLDS_OBJECT (json_parser_get_root (parser)))
    {
      format_error (error, st, NULL, "the header is not a JSON object");
      goto out;
    }
  root = json_node_get_object (json_parser_get_root (parser));

  members = json_object_get_members (root);
  for (l = members; l != NULL; l = l->next)
    {
      const char *name = l->data;
      JsonNode *node = json_object_get_member (root, name);

      if (strcmp (name, "__metadata__") == 0)
        {
          if (!parse_metadata (st, node, error))
            goto out;
        }
      else if (!parse_entry (st, name, node, error))
        goto out;
    }
  ok = check_overlaps (st, error);

out:
  g_list_free (members);
  g_object_unref (parser);
  return ok;
}

DfSafetensors *
df_safetensors_open (const char *path, GError **error)
{
  DfSafetensors *st;
  GError *local = NULL;
  const guint8 *bytes;
  gsize size;
  guint64 hlen;

  g_return_val_if_fail (path != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  st = g_new0 (DfSafetensors, 1);
  st->path = g_strdup (path);
  st->entries = g_ptr_array_new_with_free_func (entry_free);
  st->by_name = g_hash_table_new (g_str_hash, g_str_equal);
  st->metadata = g_hash_table_new_full (g_str_hash, g_str_equal, g_free,
                                        g_free);

  /* Map the file. */
  st->mapped = g_mapped_file_new (path, FALSE, &local);
  if (st->mapped == NULL)
    {
      g_set_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_IO,
                   "%s: %s", path, local->message);
      g_error_free (local);
      goto fail;
    }
  bytes = (const guint8 *) g_mapped_file_get_contents (st->mapped);
  size = g_mapped_file_get_length (st->mapped);

  /* The header length, then the header itself, must fit the file. */
  if (size < 8)
    {
      format_error (error, st, NULL, "the file has %" G_GSIZE_FORMAT " bytes, "
                    "fewer than the 8 of the header length", size);
      goto fail;
    }
  memcpy (&hlen, bytes, 8);
  hlen = GUINT64_FROM_LE (hlen);
  if (hlen > size - 8)
    {
      format_error (error, st, NULL, "the header length %" G_GUINT64_FORMAT
                    " runs past the end of the file (%" G_GSIZE_FORMAT
                    " bytes)", hlen, size);
      goto fail;
    }
  st->data = bytes + 8 + hlen;
  st->data_size = size - 8 - hlen;

  if (!parse_header (st, (const char *) bytes + 8, hlen, error))
    goto fail;
  return st;

fail:
  df_safetensors_free (st);
  return NULL;
}

void
df_safetensors_free (DfSafetensors *st)
{
  if (st == NULL)
    return;
  if (st->mapped != NULL)
    g_mapped_file_unref (st->mapped);
  g_hash_table_destroy (st->by_name);
  g_ptr_array_free (st->entries, TRUE);
  g_hash_table_destroy (st->metadata);
  g_free (st->path);
  g_free (st);
}

const char *
df_safetensors_path (DfSafetensors *st)
{
  g_return_val_if_fail (st != NULL, NULL);
  return st->path;
}

const char *
df_safetensors_get_metadata (DfSafetensors *st, const char *key)
{
  g_return_val_if_fail (st != NULL && key != NULL, NULL);
  return g_hash_table_lookup (st->metadata, key);
}

gboolean
df_safetensors_has (DfSafetensors *st, const char *name)
{
  g_return_val_if_fail (st != NULL && name != NULL, FALSE);
  return g_hash_table_contains (st->by_name, name);
}

char **
df_safetensors_names (DfSafetensors *st)
{
  char **names;
  guint i;

  g_return_val_if_fail (st != NULL, NULL);
  names = g_new0 (char *, st->entries->len + 1);
  for (i = 0; i < st->entries->len; i++)
    names[i] = g_strdup (((Entry *) st->entries->pdata[i])->name);
  return names;
}

gboolean
df_safetensors_shape (DfSafetensors *st, const char *name, int *ndim,
                      gint64 *shape)
{
  const Entry *e;

  g_return_val_if_fail (st != NULL && name != NULL, FALSE);
  e = g_hash_table_lookup (st->by_name, name);
  if (e == NULL)
    return FALSE;
  if (ndim != NULL)
    *ndim = e->ndim;
  if (shape != NULL)
    memcpy (shape, e->shape, sizeof e->shape);
  return TRUE;
}

static char *
shape_string (int ndim, const gint64 *shape)
{
  GString *s = g_string_new ("[");
  int i;

  for (i = 0; i < ndim; i++)
    g_string_append_printf (s, "%s%" G_GINT64_FORMAT, i ? ", " : "",
                            shape[i]);
  g_string_append_c (s, ']');
  return g_string_free (s, FALSE);
}

gboolean
df_safetensors_read_f32 (DfSafetensors *st, const char *name, int ndim,
                         const gint64 *shape, float *out, GError **error)
{
  const Entry *e;
  const guint8 *src;
  guint64 n, i;

  g_return_val_if_fail (st != NULL && name != NULL, FALSE);
  g_return_val_if_fail (ndim >= 0 && ndim <= DF_ST_MAX_DIMS, FALSE);
  g_return_val_if_fail (ndim == 0 || shape != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  e = g_hash_table_lookup (st->by_name, name);
  if (e == NULL)
    {
      g_set_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_MISSING,
                   "%s: no tensor \"%s\"; the file is not a model of this "
                   "kind, or was saved by another program", st->path, name);
      return FALSE;
    }
  if (e->ndim != ndim
      || (ndim > 0 && memcmp (e->shape, shape, ndim * sizeof (gint64)) != 0))
    {
      char *have = shape_string (e->ndim, e->shape);
      char *want = shape_string (ndim, shape);

      g_set_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_SHAPE,
                   "%s: tensor \"%s\" has shape %s but the model needs %s; "
                   "the file's config does not match its weights",
                   st->path, name, have, want);
      g_free (have);
      g_free (want);
      return FALSE;
    }
  if (e->dtype == DTYPE_OTHER)
    {
      g_set_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_DTYPE,
                   "%s: tensor \"%s\" has dtype %s; the engine reads F32, "
                   "F16 and BF16 (convert the file)", st->path, name,
                   e->dtype_name);
      return FALSE;
    }

  /* Convert; the data section need not be aligned, so read bytes. */
  g_return_val_if_fail (out != NULL || e->end == e->begin, FALSE);
  src = st->data + e->begin;
  n = (e->end - e->begin) / e->dtype_size;
  switch (e->dtype)
    {
    case DTYPE_F32:
#if G_BYTE_ORDER == G_LITTLE_ENDIAN
      if (n > 0)
        memcpy (out, src, n * 4);
#else
      for (i = 0; i < n; i++)
        {
          guint32 v;

          memcpy (&v, src + 4 * i, 4);
          out[i] = bits_to_float (GUINT32_FROM_LE (v));
        }
#endif
      break;
    case DTYPE_F16:
      for (i = 0; i < n; i++)
        out[i] = f16_to_float ((guint16) (src[2 * i] | src[2 * i + 1] << 8));
      break;
    case DTYPE_BF16:
      for (i = 0; i < n; i++)
        out[i] = bf16_to_float ((guint16) (src[2 * i] | src[2 * i + 1] << 8));
      break;
    case DTYPE_OTHER:
    default:
      g_assert_not_reached ();
    }
  return TRUE;
}

/* ---- writer ---- */

gboolean
df_safetensors_write (const char *path, const char *const *metadata,
                      const DfSafetensorsEntry *entries, int n_entries,
                      GError **error)
{
  JsonBuilder *b;
  JsonGenerator *gen;
  JsonNode *root;
  GHashTable *seen;
  char *json;
  gsize json_len, padded, total;
  guint64 offset = 0, hlen_le;
  guint8 *file;
  gboolean ok = FALSE;
  int i, d;

  g_return_val_if_fail (path != NULL, FALSE);
  g_return_val_if_fail (n_entries >= 0 && (n_entries == 0 || entries), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  /* The header, __metadata__ first as other writers put it. */
  b = json_builder_new ();
  seen = g_hash_table_new (g_str_hash, g_str_equal);
  json_builder_begin_object (b);
  if (metadata != NULL && metadata[0] != NULL)
    {
      json_builder_set_member_name (b, "__metadata__");
      json_builder_begin_object (b);
      for (i = 0; metadata[i] != NULL; i += 2)
        {
          g_return_val_if_fail (metadata[i + 1] != NULL, FALSE);
          json_builder_set_member_name (b, metadata[i]);
          json_builder_add_string_value (b, metadata[i + 1]);
        }
      json_builder_end_object (b);
    }
  for (i = 0; i < n_entries; i++)
    {
      const DfSafetensorsEntry *e = &entries[i];
      guint64 count = 1;

      g_return_val_if_fail (e->name != NULL, FALSE);
      g_return_val_if_fail (e->ndim >= 0 && e->ndim <= DF_ST_MAX_DIMS, FALSE);
      if (strcmp (e->name, "__metadata__") == 0
          || !g_hash_table_add (seen, (gpointer) e->name))
        {
          g_set_error (error, DF_SAFETENSORS_ERROR,
                       DF_SAFETENSORS_ERROR_FORMAT, "%s: cannot write two "
                       "tensors named \"%s\"", path, e->name);
          goto out;
        }
      json_builder_set_member_name (b, e->name);
      json_builder_begin_object (b);
      json_builder_set_member_name (b, "dtype");
      json_builder_add_string_value (b, "F32");
      json_builder_set_member_name (b, "shape");
      json_builder_begin_array (b);
      for (d = 0; d < e->ndim; d++)
        {
          g_return_val_if_fail (e->shape[d] >= 0, FALSE);
          json_builder_add_int_value (b, e->shape[d]);
          count *= (guint64) e->shape[d];
        }
      json_builder_end_array (b);
      g_return_val_if_fail (e->data != NULL || count == 0, FALSE);
      json_builder_set_member_name (b, "data_offsets");
      json_builder_begin_array (b);
      json_builder_add_int_value (b, (gint64) offset);
      offset += count * 4;
      json_builder_add_int_value (b, (gint64) offset);
      json_builder_end_array (b);
      json_builder_end_object (b);
    }
  json_builder_end_object (b);

  root = json_builder_get_root (b);
  gen = json_generator_new ();
  json_generator_set_root (gen, root);
  json = json_generator_to_data (gen, &json_len);
  g_object_unref (gen);
  json_node_unref (root);

  /* Pad the header with spaces so the data starts 8-aligned; tensors follow
   * back to back (F32 keeps each one 4-aligned), as other readers require. */
  padded = (json_len + 7) & ~(gsize) 7;
  total = 8 + padded + offset;
  file = g_malloc (total);
  hlen_le = GUINT64_TO_LE ((guint64) padded);
  memcpy (file, &hlen_le, 8);
  memcpy (file + 8, json, json_len);
  memset (file + 8 + json_len, ' ', padded - json_len);
  offset = 0;
  for (i = 0; i < n_entries; i++)
    {
      const DfSafetensorsEntry *e = &entries[i];
      guint64 count = 1;

      for (d = 0; d < e->ndim; d++)
        count *= (guint64) e->shape[d];
#if G_BYTE_ORDER == G_LITTLE_ENDIAN
      if (count > 0)
        memcpy (file + 8 + padded + offset, e->data, count * 4);
#else
      for (guint64 k = 0; k < count; k++)
        {
          guint32 v;

          memcpy (&v, &e->data[k], 4);
          v = GUINT32_TO_LE (v);
          memcpy (file + 8 + padded + offset + 4 * k, &v, 4);
        }
#endif
      offset += count * 4;
    }
  g_free (json);

  /* Temporary file, fsync, rename: a failure leaves the previous file. */
  ok = g_file_set_contents_full (path, (const char *) file, (gssize) total,
                                 G_FILE_SET_CONTENTS_CONSISTENT
                                 | G_FILE_SET_CONTENTS_DURABLE, 0644, error);
  if (!ok && error != NULL && *error != NULL)
    {
      GError *e = *error;

      *error = g_error_new (DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_IO,
                            "%s", e->message);
      g_error_free (e);
    }
  g_free (file);

out:
  g_hash_table_destroy (seen);
  g_object_unref (b);
  return ok;
}
