/* test-rng.c: the counter-based generator (Philox4x32-10). */
#include <math.h>
#include <string.h>

#include "rng.h"

#define N_STAT 1000000

/* Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter
 * (4 words), key (2 words), output (4 words).  Through rng.h's layout the
 * counter is (block, step, index low, index high) and the key the seed, so
 * output words (0, 1) and (2, 3) are u64 positions 2 block and 2 block + 1. */
static void
test_philox_known_answers (void)
{
  static const struct {
    guint32 ctr[4], key[2], out[4];
  } kat[] = {
    { { 0, 0, 0, 0 }, { 0, 0 },
      { 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8 } },
    { { 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff },
      { 0xffffffff, 0xffffffff },
      { 0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd } },
    { { 0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344 },
      { 0xa4093822, 0x299f31d0 },
      { 0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1 } },
  };

  for (unsigned k = 0; k < G_N_ELEMENTS (kat); k++)
    {
      guint64 seed = kat[k].key[0] | (guint64) kat[k].key[1] << 32;
      guint64 index = kat[k].ctr[2] | (guint64) kat[k].ctr[3] << 32;
      guint64 pos = 2 * (guint64) kat[k].ctr[0];
      guint64 lo = df_rng_u64 (seed, index, kat[k].ctr[1], pos);
      guint64 hi = df_rng_u64 (seed, index, kat[k].ctr[1], pos + 1);

      g_assert_cmphex (lo, ==, kat[k].out[0] | (guint64) kat[k].out[1] << 32);
      g_assert_cmphex (hi, ==, kat[k].out[2] | (guint64) kat[k].out[3] << 32);
    }
}

/* The same stream twice gives the same bits. */
static void
test_deterministic (void)
{
  float a[1000], b[1000];

  df_rng_normal (42, 3, 7, a, 1000);
  df_rng_normal (42, 3, 7, b, 1000);
  g_assert_cmpmem (a, sizeof a, b, sizeof b);
  df_rng_uniform (42, 3, DF_RNG_STEP_INIT, a, 1000);
  df_rng_uniform (42, 3, DF_RNG_STEP_INIT, b, 1000);
  g_assert_cmpmem (a, sizeof a, b, sizeof b);
  g_assert_cmphex (df_rng_u64 (5, 6, 7, 8), ==, df_rng_u64 (5, 6, 7, 8));
}

/* Any chunking of a stream, odd offsets and lengths included, and any
 * prefix, give the numbers of one long call; large calls run threaded. */
static void
test_chunking (void)
{
  const gsize n = 100001;
  static const gsize cuts[] = { 0, 1, 4, 7, 517, 518, 40000, 100001 };
  float *whole = g_new (float, n), *parts = g_new (float, n);
  float prefix[7];

  for (int kind = 0; kind < 2; kind++)
    {
      if (kind == 0)
        df_rng_normal (9, 1, 2, whole, n);
      else
        df_rng_uniform (9, 1, 2, whole, n);
      memset (parts, 0, n * sizeof (float));
      for (unsigned c = 0; c + 1 < G_N_ELEMENTS (cuts); c++)
        {
          gsize off = cuts[c], len = cuts[c + 1] - cuts[c];

          if (kind == 0)
            df_rng_normal_at (9, 1, 2, off, parts + off, len);
          else
            df_rng_uniform_at (9, 1, 2, off, parts + off, len);
        }
      g_assert_cmpmem (whole, n * sizeof (float), parts, n * sizeof (float));

      if (kind == 0)
        df_rng_normal (9, 1, 2, prefix, 7);
      else
        df_rng_uniform (9, 1, 2, prefix, 7);
      g_assert_cmpmem (whole, sizeof prefix, prefix, sizeof prefix);
    }
  g_free (whole);
  g_free (parts);
}

/* 1e6 normals: moments and a tail within 5 standard errors of N(0, 1).
 * SE: mean 1/sqrt(N) = 1e-3; variance sqrt(2/N) = 1.41e-3; skewness
 * sqrt(6/N) = 2.45e-3; kurtosis sqrt(24/N) = 4.9e-3; P(|z| > 3) = 0.0026998
 * with SE sqrt(p (1 - p)/N) = 5.2e-5. */
static void
test_normal_moments (void)
{
  float *z = g_new (float, N_STAT);
  double m1 = 0, m2 = 0, m3 = 0, m4 = 0, tail = 0, mean, var, skew, kurt;

  df_rng_normal (2024, 0, 0, z, N_STAT);
  for (int i = 0; i < N_STAT; i++)
    {
      g_assert_true (isfinite (z[i]));
      m1 += z[i];
    }
  mean = m1 / N_STAT;
  for (int i = 0; i < N_STAT; i++)
    {
      double d = z[i] - mean;

      m2 += d * d;
      m3 += d * d * d;
      m4 += d * d * d * d;
      tail += fabs (z[i]) > 3;
    }
  var = m2 / (N_STAT - 1);
  skew = m3 / N_STAT / pow (var, 1.5);
  kurt = m4 / N_STAT / (var * var);
  tail /= N_STAT;
  g_test_message ("mean %.5f var %.5f skew %.5f kurtosis %.5f P(|z|>3) "
                  "%.6f", mean, var, skew, kurt, tail);
  g_assert_cmpfloat (fabs (mean), <, 5e-3);
  g_assert_cmpfloat (fabs (var - 1), <, 7.1e-3);
  g_assert_cmpfloat (fabs (skew), <, 1.23e-2);
  g_assert_cmpfloat (fabs (kurt - 3), <, 2.45e-2);
  g_assert_cmpfloat (fabs (tail - 0.0026998), <, 2.6e-4);
  g_free (z);
}

/* 1e6 uniforms in [0, 1): mean within 5 SE (2.89e-4) of 1/2, variance
 * within 5 SE (sqrt (1/180/N) = 7.45e-5) of 1/12, deciles within 5 SE
 * (sqrt (0.09/N) = 3e-4) of 0.1. */
static void
test_uniform_moments (void)
{
  float *u = g_new (float, N_STAT);
  double sum = 0, sq = 0, mean, var, worst = 0;
  int bins[10] = { 0 };

  df_rng_uniform (77, 5, 3, u, N_STAT);
  for (int i = 0; i < N_STAT; i++)
    {
      g_assert_cmpfloat (u[i], >=, 0);
      g_assert_cmpfloat (u[i], <, 1);
      sum += u[i];
      bins[(int) (u[i] * 10)]++;
    }
  mean = sum / N_STAT;
  for (int i = 0; i < N_STAT; i++)
    sq += (u[i] - mean) * (u[i] - mean);
  var = sq / (N_STAT - 1);
  for (int b = 0; b < 10; b++)
    worst = MAX (worst, fabs (bins[b] / (double) N_STAT - 0.1));
  g_test_message ("mean %.6f var %.6f worst decile error %.2g", mean, var,
                  worst);
  g_assert_cmpfloat (fabs (mean - 0.5), <, 1.45e-3);
  g_assert_cmpfloat (fabs (var - 1.0 / 12), <, 3.7e-4);
  g_assert_cmpfloat (worst, <, 1.5e-3);
  g_free (u);
}

static double
correlation (const float *a, const float *b, gsize n)
{
  double ma = 0, mb = 0, sab = 0, saa = 0, sbb = 0;

  for (gsize i = 0; i < n; i++)
    {
      ma += a[i];
      mb += b[i];
    }
  ma /= n;
  mb /= n;
  for (gsize i = 0; i < n; i++)
    {
      sab += (a[i] - ma) * (b[i] - mb);
      saa += (a[i] - ma) * (a[i] - ma);
      sbb += (b[i] - mb) * (b[i] - mb);
    }
  return sab / sqrt (saa * sbb);
}

/* Streams that differ in one key (seed, either word; index, either word;
 * step, including the initial-noise step) are uncorrelated: |r| below 5 SE
 * (5/sqrt(n) = 0.0158 for n = 1e5); so are neighbours within a stream. */
static void
test_streams_uncorrelated (void)
{
  static const struct { guint64 seed, index; guint32 step; } other[] = {
    { 2, 0, 0 }, { 1 | (G_GUINT64_CONSTANT (1) << 32), 0, 0 },
    { 1, 1, 0 }, { 1, G_GUINT64_CONSTANT (1) << 32, 0 },
    { 1, 0, 1 }, { 1, 0, DF_RNG_STEP_INIT }, { 0, 1, 0 },
  };
  const gsize n = 100000;
  float *a = g_new (float, n + 1), *b = g_new (float, n);
  double worst = 0, r;

  df_rng_normal (1, 0, 0, a, n + 1);
  for (unsigned k = 0; k < G_N_ELEMENTS (other); k++)
    {
      df_rng_normal (other[k].seed, other[k].index, other[k].step, b, n);
      r = correlation (a, b, n);
      worst = MAX (worst, fabs (r));
      g_assert_cmpfloat (fabs (r), <, 5 / sqrt (n));
      g_assert_true (memcmp (a, b, 64) != 0);
    }

  /* Lag 1 (each Box-Muller pair and across blocks) and lag 2. */
  r = correlation (a, a + 1, n);
  worst = MAX (worst, fabs (r));
  g_assert_cmpfloat (fabs (r), <, 5 / sqrt (n));
  r = correlation (a, a + 2, n - 1);
  worst = MAX (worst, fabs (r));
  g_assert_cmpfloat (fabs (r), <, 5 / sqrt (n));
  g_test_message ("worst |correlation| %.4f (bound %.4f)", worst,
                  5 / sqrt (n));
  g_free (a);
  g_free (b);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/engine/rng/philox-known-answers",
                   test_philox_known_answers);
  g_test_add_func ("/engine/rng/deterministic", test_deterministic);
  g_test_add_func ("/engine/rng/chunking", test_chunking);
  g_test_add_func ("/engine/rng/normal-moments", test_normal_moments);
  g_test_add_func ("/engine/rng/uniform-moments", test_uniform_moments);
  g_test_add_func ("/engine/rng/streams-uncorrelated",
                   test_streams_uncorrelated);
  return g_test_run ();
}
