/* rng.c: Philox4x32-10 (Salmon et al., SC'11), the layout in rng.h.
 *
 * Checked against Random123's known-answer vectors in tests/test-rng.c.
 */
#include "rng.h"

#include <math.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* Below this many blocks a parallel region costs more than it saves. */
#define PAR_MIN_BLOCKS 16384

typedef struct { guint32 v[4]; } Block;

static inline Block
philox (guint32 c0, guint32 c1, guint32 c2, guint32 c3, guint32 k0,
        guint32 k1)
{
  Block b;

  for (int r = 0; r < 10; r++)
    {
      guint64 p0 = (guint64) PHILOX_M0 * c0;
      guint64 p1 = (guint64) PHILOX_M1 * c2;
      guint32 n0 = (guint32) (p1 >> 32) ^ c1 ^ k0;
      guint32 n2 = (guint32) (p0 >> 32) ^ c3 ^ k1;

      c1 = (guint32) p1;
      c3 = (guint32) p0;
      c0 = n0;
      c2 = n2;
      k0 += PHILOX_W0;
      k1 += PHILOX_W1;
    }
  b.v[0] = c0;
  b.v[1] = c1;
  b.v[2] = c2;
  b.v[3] = c3;
  return b;
}

static inline Block
stream_block (guint64 seed, guint64 index, guint32 step, guint64 block)
{
  return philox ((guint32) block, step, (guint32) index,
                 (guint32) (index >> 32), (guint32) seed,
                 (guint32) (seed >> 32));
}

/* Both normals of a block: Box-Muller on two 53-bit uniforms, u1 in (0, 1]
 * so the log is finite. */
static inline void
block_normals (Block b, double *z0, double *z1)
{
  guint64 a = (guint64) b.v[0] | (guint64) b.v[1] << 32;
  guint64 c = (guint64) b.v[2] | (guint64) b.v[3] << 32;
  double u1 = ((a >> 11) + 1) * 0x1p-53;
  double u2 = (c >> 11) * 0x1p-53;
  double r = sqrt (-2.0 * log (u1));

  *z0 = r * cos (2 * G_PI * u2);
  *z1 = r * sin (2 * G_PI * u2);
}

static inline void
normal_pair (guint64 seed, guint64 index, guint32 step, guint64 block,
             float *out)
{
  double a, b;

  block_normals (stream_block (seed, index, step, block), &a, &b);
  out[0] = (float) a;
  out[1] = (float) b;
}

void
df_rng_normal_at (guint64 seed, guint64 index, guint32 step, guint64 offset,
                  float *out, gsize n)
{
  gsize head, pairs;
  double z0, z1;

  g_return_if_fail (out != NULL || n == 0);

  /* An odd offset starts on the sine half of a block. */
  head = (offset & 1) && n > 0 ? 1 : 0;
  if (head)
    {
      block_normals (stream_block (seed, index, step, offset / 2), &z0, &z1);
      out[0] = (float) z1;
    }

  /* Whole blocks, each two normals. */
  pairs = (n - head) / 2;
  {
    guint64 first = (offset + head) / 2;
    float *o = out + head;

    /* Threads only for long streams: even an if(0) region costs a team. */
    if (pairs >= PAR_MIN_BLOCKS)
      {
#pragma omp parallel for schedule(static)
        for (gsize i = 0; i < pairs; i++)
          normal_pair (seed, index, step, first + i, o + 2 * i);
      }
    else
      for (gsize i = 0; i < pairs; i++)
        normal_pair (seed, index, step, first + i, o + 2 * i);
  }

  /* A last cosine half. */
  if (head + 2 * pairs < n)
    {
      block_normals (stream_block (seed, index, step,
                                   (offset + n - 1) / 2), &z0, &z1);
      out[n - 1] = (float) z0;
    }
}

void
df_rng_normal (guint64 seed, guint64 index, guint32 step, float *out,
               gsize n)
{
  df_rng_normal_at (seed, index, step, 0, out, n);
}

static inline float
uniform_at (guint64 seed, guint64 index, guint32 step, guint64 pos)
{
  Block b = stream_block (seed, index, step, pos / 4);

  return (float) ((b.v[pos % 4] >> 8) * 0x1p-24);
}

void
df_rng_uniform_at (guint64 seed, guint64 index, guint32 step, guint64 offset,
                   float *out, gsize n)
{
  g_return_if_fail (out != NULL || n == 0);

  /* 24 bits a word: every float of [0, 1) on the 2^-24 grid, never 1. */
  if (n >= 4 * PAR_MIN_BLOCKS)
    {
#pragma omp parallel for schedule(static)
      for (gsize i = 0; i < n; i++)
        out[i] = uniform_at (seed, index, step, offset + i);
    }
  else
    for (gsize i = 0; i < n; i++)
      out[i] = uniform_at (seed, index, step, offset + i);
}

void
df_rng_uniform (guint64 seed, guint64 index, guint32 step, float *out,
                gsize n)
{
  df_rng_uniform_at (seed, index, step, 0, out, n);
}

guint64
df_rng_u64 (guint64 seed, guint64 index, guint32 step, guint64 pos)
{
  Block b = stream_block (seed, index, step, pos / 2);
  int w = (int) (pos % 2) * 2;

  return (guint64) b.v[w] | (guint64) b.v[w + 1] << 32;
}
