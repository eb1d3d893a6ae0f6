/* rng.h: counter-based noise (Philox4x32-10).
 *
 * A stream of normals is a pure function of (seed, sample index, step), so a
 * sample's noise does not depend on batch size, batch position or threads.
 */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

/* Step key of the initial noise x_T; denoising step k (0-based) uses k. */
#define DF_RNG_STEP_INIT  G_MAXUINT32

/* Layout: Philox4x32-10 with key = seed (low word first) and counter =
 * (block, step, index low, index high).  Normal j of a stream comes from
 * block j / 2 (two 64-bit uniforms, Box-Muller in double: j even the cosine,
 * j odd the sine), uniform j from word j % 4 of block j / 4, u64 j from words
 * 2 (j % 2), +1 of block j / 2.  Every value is a pure function of (seed,
 * index, step, position), so any chunking of a stream gives the same numbers.
 * A stream is 2^32 blocks long (2^33 normals); positions wrap beyond that. */

/* out[0..n) ~ N(0, 1), the n first normals of stream (seed, index, step). */
void  df_rng_normal   (guint64 seed, guint64 index, guint32 step,
                       float *out, gsize n);

/* out[0..n) ~ U[0, 1), the n first uniforms of stream (seed, index, step). */
void  df_rng_uniform  (guint64 seed, guint64 index, guint32 step,
                       float *out, gsize n);

/* Normals offset..offset+n-1 of stream (seed, index, step) into out[n]. */
void  df_rng_normal_at  (guint64 seed, guint64 index, guint32 step,
                         guint64 offset, float *out, gsize n);

/* Uniforms offset..offset+n-1 of stream (seed, index, step) into out[n]. */
void  df_rng_uniform_at (guint64 seed, guint64 index, guint32 step,
                         guint64 offset, float *out, gsize n);

/* One 64-bit draw from stream (seed, index, step) at position pos. */
guint64 df_rng_u64    (guint64 seed, guint64 index, guint32 step, guint64 pos);

G_END_DECLS
