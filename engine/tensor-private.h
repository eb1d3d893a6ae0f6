/* tensor-private.h: how operations (tensor.c, ops.c) record themselves on a
 * DfGraph.  Not part of the engine's API.
 */
#pragma once

#include <math.h>
#include <string.h>

#include "tensor.h"

G_BEGIN_DECLS

typedef struct _DfRecord DfRecord;

typedef void (*DfBackwardFunc) (DfGraph *g, DfRecord *r);

#define DF_RECORD_INPUTS 5

/* One recorded operation: its output, its inputs (tensors or parameters)
 * and whatever small state its backward needs. */
struct _DfRecord {
  DfBackwardFunc  backward;
  DfTensor       *out;
  DfTensor       *in[DF_RECORD_INPUTS];
  void           *saved;       /* graph-recycled buffer, or NULL */
  int             iarg[4];
  float           farg[2];
};

/* TRUE when g records and one of the (possibly NULL) tensors needs a grad. */
gboolean   df_graph_wants       (DfGraph *g, DfTensor *a, DfTensor *b,
                                 DfTensor *c, DfTensor *d);
/* Push a record for out (which gets requires_grad); the pointer is valid
 * until the next df_graph_push. */
DfRecord  *df_graph_push        (DfGraph *g, DfBackwardFunc backward,
                                 DfTensor *out);
/* A buffer kept until the next reset, recycled in the same sequence. */
void      *df_graph_saved       (DfGraph *g, gsize bytes);
/* Scratch floats, valid until the next df_graph_workspace call. */
float     *df_graph_workspace   (DfGraph *g, gsize n_floats);

/* The grad of t if it takes one (zeroed on first use this pass), or NULL. */
static inline float *
df_grad_or_null (DfTensor *t)
{
  return t != NULL && t->requires_grad ? df_tensor_grad (t) : NULL;
}

/* t->grad for an operation that gives every element a value: *fresh is
 * TRUE when nothing has flowed into it this pass, and then the buffer is
 * not zeroed, for the caller to store into instead of adding (tensor.c).
 * Ask before anything else takes t's grad: df_grad_or_null would zero it
 * and make it not fresh. */
float *df_tensor_grad_fresh (DfTensor *t, gboolean *fresh);

/* t->grad += g (t->size floats), stored instead where nothing has flowed
 * into it yet this pass (tensor.c). */
void df_grad_accumulate (DfTensor *t, const float *g);

/* The same through df_tensor_grad_fresh. */
static inline float *
df_grad_fresh_or_null (DfTensor *t, gboolean *fresh)
{
  *fresh = FALSE;
  return t != NULL && t->requires_grad ? df_tensor_grad_fresh (t, fresh)
                                       : NULL;
}

/* e^x in float, within 1 ulp of the exact value (Cephes' polynomial),
 * written so that loops over arrays vectorise: libm's expf is a call per
 * element, which made SiLU cost as much as a convolution's GEMM.  |x| is
 * clamped to 87.3 (e^x stays a normal float, ~8e37 at most); NaN stays NaN. */
static inline float
df_expf (float x)
{
  float ax = fabsf (x), n, r, p, s;
  gint32 bits;

  /* One select on |x| (two on x defeat GCC's if-conversion). */
  ax = ax > 87.3f ? 87.3f : ax;
  x = copysignf (ax, x);

  /* x = n ln2 + r, |r| <= ln2 / 2; n rounded by the 1.5 2^23 trick. */
  n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;

  /* e^r = 1 + r + r^2 p(r) */
  p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;

  /* times 2^n, built in the exponent bits (shifted unsigned: for a NaN x,
   * whose result is NaN anyway, n + 127 is negative) */
  bits = (gint32) ((guint32) ((gint32) n + 127) << 23);
  memcpy (&s, &bits, sizeof s);
  return p * s;
}

/* SiLU x sigmoid (x) and its derivative s (1 + x (1 - s)), s = sigmoid (x):
 * one definition for df_silu and df_group_norm_silu, so the two give the
 * same bits. */
static inline float
df_silu_of (float x)
{
  return x / (1.0f + df_expf (-x));
}

static inline float
df_silu_slope (float x)
{
  float s = 1.0f / (1.0f + df_expf (-x));

  return s * (1.0f + x * (1.0f - s));
}

/* The engine's loops are compiled for x86-64-v4 (AVX-512) and x86-64-v3
 * (AVX2) besides the baseline (SSE2), and the CPU picks one as the program
 * loads (GCC's target_clones, an ifunc): one binary runs on any x86-64 at
 * the speed of the machine it is on.  The clones differ in vector width
 * only (C11 mode contracts no multiply-add into an FMA), so they give the
 * same bits; OpenBLAS's kernels are chosen per CPU and round as they
 * do. */
#if defined (__GNUC__) && !defined (__clang__) && defined (__x86_64__) \
    && defined (DF_HAVE_IFUNC)
#define DF_HOT \
  __attribute__ ((target_clones ("arch=x86-64-v4", "arch=x86-64-v3", \
                                 "default")))
#else
#define DF_HOT
#endif

/* dst = src, in blocks spread over the threads (tensor.c). */
void df_copy_floats (float *dst, const float *src, gsize n);

/* Sums of a[0 .. n) and of its squares in double over 8 interleaved lanes
 * (ops.c): the order depends on n only. */
double df_sum_f  (const float *a, gsize n);
double df_sum_sq (const float *a, gsize n);

/* OpenMP only pays off past some work; results never depend on it. */
#define DF_PAR_MIN 8192

/* Floats of scratch a batch-n "same" convolution (k x k, stride 1, size
 * s x s) asks df_graph_workspace for, forward or backward, on threads
 * threads: for the trainer's memory estimate. */
double df_conv2d_scratch (int n, int ci, int co, int k, int s, int threads);

G_END_DECLS
