/* npy.c: NumPy .npy files holding one float32 NCHW array.
 *
 * Format 1.0: "\x93NUMPY", major 1, minor 0, a little-endian u16 header
 * length, then a Python dict literal such as
 *   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 8, 8), }
 * padded with spaces and a newline, then the raw data.
 */
#include "cli.h"

#include <string.h>

#define MAGIC      "\x93NUMPY"
#define MAGIC_LEN  6

typedef struct {
  const char *p, *end;
} Scanner;

static void
skip_space (Scanner *s)
{
  while (s->p < s->end && g_ascii_isspace (*s->p))
    s->p++;
}

static gboolean
expect (Scanner *s, char c)
{
  skip_space (s);
  if (s->p < s->end && *s->p == c)
    {
      s->p++;
      return TRUE;
    }
  return FALSE;
}

/* A quoted Python string ('...' or "..."), without escapes. */
static char *
scan_string (Scanner *s)
{
  const char *start;
  char q;

  skip_space (s);
  if (s->p >= s->end || (*s->p != '\'' && *s->p != '"'))
    return NULL;
  q = *s->p++;
  start = s->p;
  while (s->p < s->end && *s->p != q)
    s->p++;
  if (s->p >= s->end)
    return NULL;
  return g_strndup (start, s->p++ - start);
}

static gboolean
scan_word (Scanner *s, const char *word)
{
  gsize n = strlen (word);

  skip_space (s);
  if ((gsize) (s->end - s->p) >= n && strncmp (s->p, word, n) == 0)
    {
      s->p += n;
      return TRUE;
    }
  return FALSE;
}

/* (a, b, c, d) or (a,) or (); at most 8 entries. */
static gboolean
scan_shape (Scanner *s, gint64 *shape, int *ndim)
{
  *ndim = 0;
  if (!expect (s, '('))
    return FALSE;
  for (;;)
    {
      char *endp;
      gint64 v;

      if (expect (s, ')'))
        return TRUE;
      skip_space (s);
      if (s->p >= s->end || !g_ascii_isdigit (*s->p) || *ndim == 8)
        return FALSE;
      v = g_ascii_strtoll (s->p, &endp, 10);
      if (endp > s->end || v < 0 || v > G_MAXINT)
        return FALSE;
      s->p = endp;
      shape[(*ndim)++] = v;
      if (!expect (s, ',') && !(skip_space (s), s->p < s->end && *s->p == ')'))
        return FALSE;
    }
}

float *
cli_npy_read (const char *path, int shape[4], GError **error)
{
  char *contents, *descr = NULL, *key = NULL;
  gsize length, hlen, expected;
  Scanner s;
  gboolean fortran = FALSE, have_descr = FALSE, have_order = FALSE;
  gboolean have_shape = FALSE;
  gint64 dims[8];
  int ndim = 0;
  float *out = NULL;

  if (!g_file_get_contents (path, &contents, &length, error))
    return NULL;

  /* Magic and version. */
  if (length < MAGIC_LEN + 4 || memcmp (contents, MAGIC, MAGIC_LEN) != 0)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s is not a .npy file (no \\x93NUMPY magic): save the "
                   "array with numpy.save", path);
      goto out;
    }
  if (contents[6] != 1 || contents[7] != 0)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s: .npy format version %d.%d, only 1.0 is read (numpy "
                   "writes 1.0 for arrays like these)", path,
                   (guint8) contents[6], (guint8) contents[7]);
      goto out;
    }
  hlen = (guint8) contents[8] | ((gsize) (guint8) contents[9] << 8);
  if (MAGIC_LEN + 4 + hlen > length)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s: truncated .npy file (header of %" G_GSIZE_FORMAT
                   " bytes, file of %" G_GSIZE_FORMAT ")", path, hlen, length);
      goto out;
    }

  /* The header dict: exactly the three keys numpy writes. */
  s.p = contents + MAGIC_LEN + 4;
  s.end = s.p + hlen;
  if (!expect (&s, '{'))
    goto bad_header;
  while (!expect (&s, '}'))
    {
      g_free (key);
      key = scan_string (&s);
      if (key == NULL || !expect (&s, ':'))
        goto bad_header;
      if (strcmp (key, "descr") == 0 && !have_descr)
        {
          descr = scan_string (&s);
          if (descr == NULL)
            goto bad_header;
          have_descr = TRUE;
        }
      else if (strcmp (key, "fortran_order") == 0 && !have_order)
        {
          if (scan_word (&s, "True"))
            fortran = TRUE;
          else if (!scan_word (&s, "False"))
            goto bad_header;
          have_order = TRUE;
        }
      else if (strcmp (key, "shape") == 0 && !have_shape)
        {
          if (!scan_shape (&s, dims, &ndim))
            goto bad_header;
          have_shape = TRUE;
        }
      else
        goto bad_header;
      if (!expect (&s, ','))
        {
          if (!expect (&s, '}'))
            goto bad_header;
          break;
        }
    }
  if (!have_descr || !have_order || !have_shape)
    goto bad_header;

  /* What this command reads: float32, C order, N,C,H,W. */
  if (strcmp (descr, "<f4") != 0)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s: dtype '%s', expected '<f4' (little-endian float32): "
                   "save x.astype(numpy.float32)", path, descr);
      goto out;
    }
  if (fortran)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s: Fortran-ordered array, expected C order: save "
                   "numpy.ascontiguousarray(x)", path);
      goto out;
    }
  if (ndim != 4)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s: a %d-D array, expected 4-D (N, C, H, W)", path, ndim);
      goto out;
    }
  expected = 4;
  for (int i = 0; i < 4; i++)
    {
      if (dims[i] == 0)
        {
          g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                       "%s: shape has a zero dimension (%d)", path, i);
          goto out;
        }
      expected *= dims[i];
      if (expected > G_MAXUINT32 * (gsize) 4)
        {
          g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                       "%s: array too large", path);
          goto out;
        }
      shape[i] = dims[i];
    }
  if (length - (MAGIC_LEN + 4 + hlen) != expected)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "%s: %" G_GSIZE_FORMAT " data bytes, expected %"
                   G_GSIZE_FORMAT " for shape (%d, %d, %d, %d): the file is "
                   "truncated or damaged", path,
                   length - (MAGIC_LEN + 4 + hlen), expected,
                   shape[0], shape[1], shape[2], shape[3]);
      goto out;
    }
  out = g_malloc (expected);
  memcpy (out, contents + MAGIC_LEN + 4 + hlen, expected);
  goto out;

bad_header:
  g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
               "%s: malformed .npy header (expected {'descr': '<f4', "
               "'fortran_order': False, 'shape': (N, C, H, W)})", path);
out:
  g_free (key);
  g_free (descr);
  g_free (contents);
  return out;
}

GBytes *
cli_npy_encode (const float *x, const int shape[4])
{
  GString *h = g_string_new (NULL);
  GByteArray *buf = g_byte_array_new ();
  gsize n = (gsize) shape[0] * shape[1] * shape[2] * shape[3];
  guint8 prefix[MAGIC_LEN + 4];

  /* Pad so the data starts on a 64-byte boundary, as numpy does. */
  g_string_printf (h, "{'descr': '<f4', 'fortran_order': False, "
                   "'shape': (%d, %d, %d, %d), }",
                   shape[0], shape[1], shape[2], shape[3]);
  while ((MAGIC_LEN + 4 + h->len + 1) % 64 != 0)
    g_string_append_c (h, ' ');
  g_string_append_c (h, '\n');

  memcpy (prefix, MAGIC, MAGIC_LEN);
  prefix[6] = 1;
  prefix[7] = 0;
  prefix[8] = h->len & 0xff;
  prefix[9] = h->len >> 8;
  g_byte_array_append (buf, prefix, sizeof prefix);
  g_byte_array_append (buf, (const guint8 *) h->str, h->len);
  g_byte_array_append (buf, (const guint8 *) x, n * sizeof (float));
  g_string_free (h, TRUE);
  return g_byte_array_free_to_bytes (buf);
}
