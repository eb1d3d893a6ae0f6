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

/* out[0..n) ~ N(0, 1), the n first normals of stream (seed, index, step). */
void  df_rng_normal   (guint64 seed, guint64 index, guint32 step,
                       float *out, gsize n);

/* out[0..n) ~ U[0, 1), the n first uniforms of stream (seed, index, step). */
void  df_rng_uniform  (guint64 seed, guint64 index, guint32 step,
                       float *out, gsize n);

/* One 64-bit draw from stream (seed, index, step) at position pos. */
guint64 df_rng_u64    (guint64 seed, guint64 index, guint32 step, guint64 pos);

G_END_DECLS
