/* test-safetensors.c: the safetensors reader and writer.
 *
 * Damaged files are built byte by byte here, so each test shows exactly which
 * check rejects them.  Half-precision expectations are exact values written
 * as powers of two (cross-checked once with torch.tensor(..., dtype=float16
 * or bfloat16).float()).
 */
#include <math.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>

#include <glib.h>
#include <glib/gstdio.h>

#include "safetensors.h"

static char *tmpdir;

static char *
tmp_path (const char *name)
{
  return g_build_filename (tmpdir, name, NULL);
}

/* A file: u64 LE header length, the header, then data. */
static char *
write_raw (const char *name, guint64 hlen, const char *header,
           const guint8 *data, gsize data_len)
{
  GByteArray *b = g_byte_array_new ();
  guint64 le = GUINT64_TO_LE (hlen);
  char *path = tmp_path (name);
  GError *error = NULL;

  g_byte_array_append (b, (const guint8 *) &le, 8);
  g_byte_array_append (b, (const guint8 *) header, strlen (header));
  if (data_len > 0)
    g_byte_array_append (b, data, data_len);
  g_file_set_contents (path, (const char *) b->data, b->len, &error);
  g_assert_no_error (error);
  g_byte_array_free (b, TRUE);
  return path;
}

static char *
write_header (const char *name, const char *header, gsize data_len)
{
  guint8 *zeros = g_malloc0 (data_len + 1);
  char *path = write_raw (name, strlen (header), header, zeros, data_len);

  g_free (zeros);
  return path;
}

static void
assert_open_fails (const char *path, int code)
{
  GError *error = NULL;
  DfSafetensors *st = df_safetensors_open (path, &error);

  g_assert_null (st);
  g_assert_error (error, DF_SAFETENSORS_ERROR, code);
  g_test_message ("%s", error->message);
  /* Messages name the file. */
  g_assert_nonnull (strstr (error->message, path));
  g_error_free (error);
}

static void
test_round_trip (void)
{
  float a[6] = { 1.5f, -2.25f, 0.0f, -0.0f, 1e-40f, 3.4e38f };
  float s[1] = { 42.0f };
  float e[1];
  const char *const meta[] = { "format", "diffuse", "note", "{\"x\": [1]}",
                               NULL };
  DfSafetensorsEntry entries[] = {
    { "w.weight", 2, { 2, 3 }, a },
    { "scalar", 0, { 0 }, s },
    { "empty", 2, { 0, 4 }, e },
  };
  char *path = tmp_path ("round.safetensors");
  GError *error = NULL;
  DfSafetensors *st;
  float back[6];
  gint64 shape[8];
  char **names;
  int ndim;

  g_assert_true (df_safetensors_write (path, meta, entries, 3, &error));
  g_assert_no_error (error);
  st = df_safetensors_open (path, &error);
  g_assert_no_error (error);

  /* Names in file order, metadata as written. */
  names = df_safetensors_names (st);
  g_assert_cmpuint (g_strv_length (names), ==, 3);
  g_assert_cmpstr (names[0], ==, "w.weight");
  g_assert_cmpstr (names[1], ==, "scalar");
  g_assert_cmpstr (names[2], ==, "empty");
  g_strfreev (names);
  g_assert_cmpstr (df_safetensors_get_metadata (st, "format"), ==, "diffuse");
  g_assert_cmpstr (df_safetensors_get_metadata (st, "note"), ==,
                   "{\"x\": [1]}");
  g_assert_null (df_safetensors_get_metadata (st, "absent"));
  g_assert_cmpstr (df_safetensors_path (st), ==, path);

  /* Shapes and bit-identical data. */
  g_assert_true (df_safetensors_shape (st, "w.weight", &ndim, shape));
  g_assert_cmpint (ndim, ==, 2);
  g_assert_cmpint (shape[0], ==, 2);
  g_assert_cmpint (shape[1], ==, 3);
  g_assert_false (df_safetensors_shape (st, "nope", &ndim, shape));
  g_assert_true (df_safetensors_has (st, "scalar"));
  g_assert_false (df_safetensors_has (st, "nope"));
  g_assert_true (df_safetensors_read_f32 (st, "w.weight", 2,
                                          (gint64[]) { 2, 3 }, back, &error));
  g_assert_no_error (error);
  g_assert_cmpmem (back, sizeof a, a, sizeof a);
  g_assert_true (df_safetensors_read_f32 (st, "scalar", 0, NULL, back,
                                          &error));
  g_assert_cmpfloat (back[0], ==, 42.0f);
  g_assert_true (df_safetensors_read_f32 (st, "empty", 2,
                                          (gint64[]) { 0, 4 }, back, &error));
  g_assert_no_error (error);
  df_safetensors_free (st);
  g_free (path);
}

static void
test_layout (void)
{
  float a[3] = { 1, 2, 3 };
  DfSafetensorsEntry entries[] = { { "abc", 1, { 3 }, a } };
  char *path = tmp_path ("layout.safetensors");
  GError *error = NULL;
  char *contents;
  gsize len;
  guint64 hlen;

  g_assert_true (df_safetensors_write (path, NULL, entries, 1, &error));
  g_assert_true (g_file_get_contents (path, &contents, &len, &error));

  /* Header padded with spaces to a multiple of 8; data right after it. */
  memcpy (&hlen, contents, 8);
  hlen = GUINT64_FROM_LE (hlen);
  g_assert_cmpuint (hlen % 8, ==, 0);
  g_assert_cmpuint (len, ==, 8 + hlen + sizeof a);
  g_assert_cmpint (contents[8], ==, '{');
  g_assert_cmpmem (contents + 8 + hlen, sizeof a, a, sizeof a);
  g_assert_nonnull (strstr (contents + 8, "\"data_offsets\""));
  g_assert_null (strstr (contents + 8, "__metadata__"));
  g_free (contents);
  g_free (path);
}

/* A one-tensor file of dtype with the given little-endian u16 values. */
static DfSafetensors *
open_half (const char *dtype, const guint16 *v, int n)
{
  char *header = g_strdup_printf ("{\"t\":{\"dtype\":\"%s\",\"shape\":[%d],"
                                  "\"data_offsets\":[0,%d]}}", dtype, n,
                                  2 * n);
  guint8 *bytes = g_malloc (2 * n);
  char *path;
  GError *error = NULL;
  DfSafetensors *st;
  int i;

  for (i = 0; i < n; i++)
    {
      bytes[2 * i] = v[i] & 0xff;
      bytes[2 * i + 1] = v[i] >> 8;
    }
  path = write_raw (dtype, strlen (header), header, bytes, 2 * n);
  st = df_safetensors_open (path, &error);
  g_assert_no_error (error);
  g_free (header);
  g_free (bytes);
  g_free (path);
  return st;
}

static void
check_half (const char *dtype, const guint16 *v, const float *want, int n)
{
  DfSafetensors *st = open_half (dtype, v, n);
  float *got = g_new (float, n);
  GError *error = NULL;
  int i;

  g_assert_true (df_safetensors_read_f32 (st, "t", 1, (gint64[]) { n }, got,
                                          &error));
  g_assert_no_error (error);
  for (i = 0; i < n; i++)
    {
      g_test_message ("%s 0x%04x -> %.9g (want %.9g)", dtype, v[i], got[i],
                      want[i]);
      if (isnan (want[i]))
        g_assert_true (isnan (got[i]));
      else
        {
          /* Exact, including the sign of zero. */
          g_assert_cmpfloat (got[i], ==, want[i]);
          g_assert_cmpint (signbit (got[i]), ==, signbit (want[i]));
        }
    }
  g_free (got);
  df_safetensors_free (st);
}

static void
test_f16 (void)
{
  const guint16 v[] = { 0x3c00, 0xc000, 0x7bff, 0x0400, 0x03ff, 0x0001,
                        0x8001, 0x0000, 0x8000, 0x3555, 0x7c00, 0xfc00,
                        0x7e00, 0x7c01, 0x2e66 };
  const float want[] = {
    1.0f, -2.0f, 65504.0f, ldexpf (1, -14), ldexpf (1023, -24),
    ldexpf (1, -24), -ldexpf (1, -24), 0.0f, -0.0f, 0.333251953125f,
    INFINITY, -INFINITY, NAN, NAN, ldexpf (0x266 | 0x400, -10 - 4),
  };

  G_STATIC_ASSERT (G_N_ELEMENTS (v) == G_N_ELEMENTS (want));
  check_half ("F16", v, want, G_N_ELEMENTS (v));
}

static void
test_bf16 (void)
{
  const guint16 v[] = { 0x3f80, 0xc0a0, 0x7f7f, 0x0080, 0x0001, 0x807f,
                        0x3eab, 0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0 };
  const float want[] = {
    1.0f, -5.0f, ldexpf (255, 120), ldexpf (1, -126), ldexpf (1, -133),
    -ldexpf (127, -133), 0.333984375f, 0.0f, -0.0f, INFINITY, -INFINITY,
    NAN,
  };

  G_STATIC_ASSERT (G_N_ELEMENTS (v) == G_N_ELEMENTS (want));
  check_half ("BF16", v, want, G_N_ELEMENTS (v));
}

/* Every F16 bit pattern against the C compiler's own _Float16 conversion. */
static void
test_f16_all (void)
{
#if defined(__FLT16_MAX__)
  guint16 *v = g_new (guint16, 65536);
  float *want = g_new (float, 65536);
  DfSafetensors *st;
  float *got = g_new (float, 65536);
  GError *error = NULL;
  int i, bad = 0;

  for (i = 0; i < 65536; i++)
    {
      _Float16 h;

      v[i] = i;
      memcpy (&h, &v[i], 2);
      want[i] = (float) h;
    }
  st = open_half ("F16", v, 65536);
  g_assert_true (df_safetensors_read_f32 (st, "t", 1, (gint64[]) { 65536 },
                                          got, &error));
  for (i = 0; i < 65536; i++)
    if (isnan (want[i]) ? !isnan (got[i])
        : memcmp (&got[i], &want[i], 4) != 0)
      bad++;
  g_test_message ("%d of 65536 F16 patterns differ", bad);
  g_assert_cmpint (bad, ==, 0);
  df_safetensors_free (st);
  g_free (v);
  g_free (want);
  g_free (got);
#else
  g_test_skip ("the compiler has no _Float16");
#endif
}

static void
test_truncated (void)
{
  char *path = tmp_path ("short.safetensors");

  g_assert_true (g_file_set_contents (path, "\x10\0\0", 3, NULL));
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_assert_true (g_file_set_contents (path, "", 0, NULL));
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
}

static void
test_truncated_data (void)
{
  float a[64] = { 0 };
  DfSafetensorsEntry entries[] = { { "t", 1, { 64 }, a } };
  char *path = tmp_path ("cut.safetensors");
  char *contents;
  gsize len;

  g_assert_true (df_safetensors_write (path, NULL, entries, 1, NULL));
  g_assert_true (g_file_get_contents (path, &contents, &len, NULL));
  g_assert_true (g_file_set_contents (path, contents, len - 10, NULL));
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (contents);
  g_free (path);
}

static void
test_header_past_end (void)
{
  const char *h = "{}";
  char *path = write_raw ("past.safetensors", 1000, h, NULL, 0);

  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
  path = write_raw ("huge.safetensors", G_MAXUINT64, h, NULL, 0);
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
}

static void
test_not_json (void)
{
  char *path = write_header ("nojson.safetensors", "{\"t\": [1, 2", 0);

  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
  path = write_header ("array.safetensors", "[1, 2, 3]", 0);
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
  path = write_header ("entry.safetensors", "{\"t\": 3}", 0);
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
  path = write_header ("nokeys.safetensors", "{\"t\": {\"dtype\":\"F32\"}}",
                       0);
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
}

static void
test_offsets_outside (void)
{
  char *path = write_header ("outside.safetensors",
                             "{\"t\":{\"dtype\":\"F32\",\"shape\":[4],"
                             "\"data_offsets\":[8,24]}}", 16);

  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
  path = write_header ("reversed.safetensors",
                       "{\"t\":{\"dtype\":\"F32\",\"shape\":[0],"
                       "\"data_offsets\":[8,4]}}", 16);
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
  path = write_header ("negative.safetensors",
                       "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],"
                       "\"data_offsets\":[-4,0]}}", 16);
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
}

static void
test_overlap (void)
{
  char *path = write_header ("overlap.safetensors",
                             "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],"
                             "\"data_offsets\":[0,8]},"
                             "\"b\":{\"dtype\":\"F32\",\"shape\":[2],"
                             "\"data_offsets\":[4,12]}}", 16);

  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);

  /* Touching is fine, and so is an empty tensor anywhere. */
  path = write_header ("touch.safetensors",
                       "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],"
                       "\"data_offsets\":[0,8]},"
                       "\"e\":{\"dtype\":\"F32\",\"shape\":[0],"
                       "\"data_offsets\":[4,4]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[2],"
                       "\"data_offsets\":[8,16]}}", 16);
  {
    GError *error = NULL;
    DfSafetensors *st = df_safetensors_open (path, &error);

    g_assert_no_error (error);
    df_safetensors_free (st);
  }
  g_free (path);
}

static void
test_size_mismatch (void)
{
  char *path = write_header ("size.safetensors",
                             "{\"t\":{\"dtype\":\"F16\",\"shape\":[2,3],"
                             "\"data_offsets\":[0,24]}}", 24);

  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
  path = write_header ("bigshape.safetensors",
                       "{\"t\":{\"dtype\":\"F32\",\"shape\":"
                       "[4294967296,4294967296],\"data_offsets\":[0,0]}}", 0);
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
}

static void
test_bad_shape (void)
{
  char *path = write_header ("negshape.safetensors",
                             "{\"t\":{\"dtype\":\"F32\",\"shape\":[-1],"
                             "\"data_offsets\":[0,0]}}", 0);

  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
  path = write_header ("rank9.safetensors",
                       "{\"t\":{\"dtype\":\"F32\",\"shape\":"
                       "[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4);
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
  path = write_header ("floatshape.safetensors",
                       "{\"t\":{\"dtype\":\"F32\",\"shape\":[1.5],"
                       "\"data_offsets\":[0,4]}}", 4);
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
}

static void
test_bad_metadata (void)
{
  char *path = write_header ("meta.safetensors",
                             "{\"__metadata__\":{\"a\":\"b\",\"n\":3}}", 0);

  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
  path = write_header ("meta2.safetensors", "{\"__metadata__\":[\"a\"]}", 0);
  assert_open_fails (path, DF_SAFETENSORS_ERROR_FORMAT);
  g_free (path);
}

static void
test_unknown_dtype (void)
{
  char *path = write_header ("dtype.safetensors",
                             "{\"t\":{\"dtype\":\"Q7\",\"shape\":[2],"
                             "\"data_offsets\":[0,8]}}", 8);
  GError *error = NULL;

  assert_open_fails (path, DF_SAFETENSORS_ERROR_DTYPE);
  g_free (path);

  /* A known dtype the engine cannot convert fails when read, naming the
   * tensor and the dtype; the file's other tensors still read. */
  {
    DfSafetensors *st;
    float out[2];

    path = write_header ("i64.safetensors",
                         "{\"ids\":{\"dtype\":\"I64\",\"shape\":[2],"
                         "\"data_offsets\":[0,16]},"
                         "\"f\":{\"dtype\":\"F32\",\"shape\":[2],"
                         "\"data_offsets\":[16,24]}}", 24);
    st = df_safetensors_open (path, &error);
    g_assert_no_error (error);
    g_assert_false (df_safetensors_read_f32 (st, "ids", 1,
                                             (gint64[]) { 2 }, out, &error));
    g_assert_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_DTYPE);
    g_test_message ("%s", error->message);
    g_assert_nonnull (strstr (error->message, "\"ids\""));
    g_assert_nonnull (strstr (error->message, "I64"));
    g_clear_error (&error);
    g_assert_true (df_safetensors_read_f32 (st, "f", 1, (gint64[]) { 2 },
                                            out, &error));
    g_assert_no_error (error);
    df_safetensors_free (st);
    g_free (path);
  }
}

static void
test_missing_and_shape (void)
{
  float a[6] = { 0 }, out[6];
  DfSafetensorsEntry entries[] = { { "w", 2, { 2, 3 }, a } };
  char *path = tmp_path ("req.safetensors");
  GError *error = NULL;
  DfSafetensors *st;

  g_assert_true (df_safetensors_write (path, NULL, entries, 1, &error));
  st = df_safetensors_open (path, &error);
  g_assert_no_error (error);

  g_assert_false (df_safetensors_read_f32 (st, "v", 2, (gint64[]) { 2, 3 },
                                           out, &error));
  g_assert_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_MISSING);
  g_test_message ("%s", error->message);
  g_assert_nonnull (strstr (error->message, "\"v\""));
  g_clear_error (&error);

  g_assert_false (df_safetensors_read_f32 (st, "w", 2, (gint64[]) { 3, 2 },
                                           out, &error));
  g_assert_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_SHAPE);
  g_test_message ("%s", error->message);
  g_assert_nonnull (strstr (error->message, "[2, 3]"));
  g_assert_nonnull (strstr (error->message, "[3, 2]"));
  g_clear_error (&error);

  g_assert_false (df_safetensors_read_f32 (st, "w", 1, (gint64[]) { 6 },
                                           out, &error));
  g_assert_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_SHAPE);
  g_clear_error (&error);
  df_safetensors_free (st);
  g_free (path);
}

static void
test_no_file (void)
{
  char *path = tmp_path ("absent.safetensors");

  assert_open_fails (path, DF_SAFETENSORS_ERROR_IO);
  g_free (path);
}

/* The writer goes through a temporary file and a rename, so a write that
 * fails (here: the file size limit) leaves the previous file whole. */
static void
test_failed_write_keeps_old (void)
{
  char *path = tmp_path ("keep.safetensors");
  float small[4] = { 1, 2, 3, 4 };
  DfSafetensorsEntry old_entry[] = { { "old", 1, { 4 }, small } };

  g_assert_true (df_safetensors_write (path, NULL, old_entry, 1, NULL));
  if (g_test_subprocess ())
    {
      struct rlimit lim = { 4096, 4096 };
      float *big = g_new0 (float, 16384);
      DfSafetensorsEntry big_entry[] = { { "new", 1, { 16384 }, big } };
      GError *error = NULL;

      signal (SIGXFSZ, SIG_IGN);
      g_assert_cmpint (setrlimit (RLIMIT_FSIZE, &lim), ==, 0);
      g_assert_false (df_safetensors_write (path, NULL, big_entry, 1,
                                            &error));
      g_assert_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_IO);
      g_test_message ("%s", error->message);
      g_error_free (error);
      g_free (big);
      g_free (path);
      return;
    }
  g_test_trap_subprocess (NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
  g_test_trap_assert_passed ();

  {
    GError *error = NULL;
    DfSafetensors *st = df_safetensors_open (path, &error);
    float back[4];

    g_assert_no_error (error);
    g_assert_true (df_safetensors_read_f32 (st, "old", 1, (gint64[]) { 4 },
                                            back, &error));
    g_assert_cmpmem (back, sizeof back, small, sizeof small);
    df_safetensors_free (st);
  }
  g_free (path);
}

static void
test_duplicate_write (void)
{
  float a[1] = { 0 };
  DfSafetensorsEntry entries[] = { { "x", 1, { 1 }, a }, { "x", 1, { 1 }, a } };
  char *path = tmp_path ("dup.safetensors");
  GError *error = NULL;

  g_assert_false (df_safetensors_write (path, NULL, entries, 2, &error));
  g_assert_error (error, DF_SAFETENSORS_ERROR, DF_SAFETENSORS_ERROR_FORMAT);
  g_error_free (error);
  g_assert_false (g_file_test (path, G_FILE_TEST_EXISTS));
  g_free (path);
}

int
main (int argc, char **argv)
{
  GError *error = NULL;
  int ret;

  g_test_init (&argc, &argv, NULL);

  /* A subprocess test works in its parent's scratch directory. */
  if (g_test_subprocess ())
    tmpdir = g_strdup (g_getenv ("DF_TEST_TMPDIR"));
  else
    {
      tmpdir = g_dir_make_tmp ("test-safetensors-XXXXXX", &error);
      g_assert_no_error (error);
      g_setenv ("DF_TEST_TMPDIR", tmpdir, TRUE);
    }

  g_test_add_func ("/engine/safetensors/round-trip", test_round_trip);
  g_test_add_func ("/engine/safetensors/layout-padded", test_layout);
  g_test_add_func ("/engine/safetensors/f16-exact", test_f16);
  g_test_add_func ("/engine/safetensors/f16-all-patterns", test_f16_all);
  g_test_add_func ("/engine/safetensors/bf16-exact", test_bf16);
  g_test_add_func ("/engine/safetensors/truncated-file", test_truncated);
  g_test_add_func ("/engine/safetensors/truncated-data", test_truncated_data);
  g_test_add_func ("/engine/safetensors/header-past-end",
                   test_header_past_end);
  g_test_add_func ("/engine/safetensors/not-json", test_not_json);
  g_test_add_func ("/engine/safetensors/offsets-outside",
                   test_offsets_outside);
  g_test_add_func ("/engine/safetensors/overlap", test_overlap);
  g_test_add_func ("/engine/safetensors/size-mismatch", test_size_mismatch);
  g_test_add_func ("/engine/safetensors/bad-shape", test_bad_shape);
  g_test_add_func ("/engine/safetensors/bad-metadata", test_bad_metadata);
  g_test_add_func ("/engine/safetensors/unknown-dtype", test_unknown_dtype);
  g_test_add_func ("/engine/safetensors/missing-and-shape",
                   test_missing_and_shape);
  g_test_add_func ("/engine/safetensors/no-file", test_no_file);
  g_test_add_func ("/engine/safetensors/failed-write-keeps-old",
                   test_failed_write_keeps_old);
  g_test_add_func ("/engine/safetensors/duplicate-name",
                   test_duplicate_write);
  ret = g_test_run ();
  if (g_test_subprocess ())
    return ret;

  /* Remove the scratch files. */
  {
    GDir *dir = g_dir_open (tmpdir, 0, NULL);
    const char *name;

    while (dir != NULL && (name = g_dir_read_name (dir)) != NULL)
      {
        char *p = tmp_path (name);

        g_unlink (p);
        g_free (p);
      }
    if (dir != NULL)
      g_dir_close (dir);
    g_rmdir (tmpdir);
  }
  g_free (tmpdir);
  return ret;
}
