/* test-ops.c: the tensor operations, forward and backward, and the graph.
 *
 * Forward passes are compared with naive double-precision loops written here
 * to PyTorch's definitions (conv2d cross-correlation with asymmetric zero
 * padding, GroupNorm with biased variance, heads as contiguous dh-wide
 * blocks of D); the loops were cross-checked once against
 * torch.nn.functional conv2d and group_norm and a view (N, L, heads, dh)
 * attention, to within 1e-5.  Gradients are compared with central
 * differences of the scalar loss sum (y * r), r random, taken in double over
 * the float forward pass; the error is max |analytic - numeric| / max
 * |numeric| per tensor.
 *
 * Legend: N batch, C channels, H, W, L tokens, D features.
 */
#include <math.h>
#include <string.h>

#include <glib.h>
#include <omp.h>

#include "blas.h"
#include "tensor.h"

/* float32 forward, eps 1e-2: truncation and rounding stay near 1e-5. */
#define GRAD_TOL 1e-3
#define GRAD_EPS 1e-2
/* forward against double loops: float rounding over <= a few hundred terms */
#define FWD_TOL 1e-5

static GRand *rng;

static void
fill_random (DfTensor *t, double scale)
{
  for (gsize i = 0; i < t->size; i++)
    t->data[i] = (float) (scale * g_rand_double_range (rng, -1.0, 1.0));
}

static DfTensor *
random_4d (int n, int c, int h, int w)
{
  DfTensor *t = df_tensor_new_4d (n, c, h, w);

  fill_random (t, 1.0);
  return t;
}

static DfTensor *
random_nd (int ndim, int d0, int d1, int d2)
{
  int shape[3] = { d0, d1, d2 };
  DfTensor *t = df_tensor_new (ndim, shape);

  fill_random (t, 1.0);
  return t;
}

/* max |y - ref| / max (1, max |ref|) */
static double
forward_error (const DfTensor *y, const double *ref)
{
  double worst = 0, top = 1;

  for (gsize i = 0; i < y->size; i++)
    {
      worst = MAX (worst, fabs (y->data[i] - ref[i]));
      top = MAX (top, fabs (ref[i]));
    }
  return worst / top;
}

static void
assert_forward (const char *what, const DfTensor *y, const double *ref,
                double tol)
{
  double err = forward_error (y, ref);

  g_test_message ("%s: worst forward error %.3g (tolerance %.1g)", what, err,
                  tol);
  g_assert_cmpfloat (err, <=, tol);
}

/* ---- a case: leaves (caller-owned tensors) and how to build y from them */

typedef struct _Case Case;
typedef DfTensor *(*BuildFunc) (DfGraph *g, Case *c);

struct _Case {
  DfTensor *t[4];
  int       n_t;
  int       stride, pad_lo, pad_hi, groups, heads, h, w;
  float     eps, s;
  int       ids[8];
  int       n_ids;
};

static void
case_free (Case *c)
{
  for (int i = 0; i < c->n_t; i++)
    df_tensor_free (c->t[i]);
}

static double
weighted_sum (const DfTensor *y, const float *r)
{
  double sum = 0;

  for (gsize i = 0; i < y->size; i++)
    sum += (double) y->data[i] * r[i];
  return sum;
}

/* Checks d sum (y * r) / d leaf for each leaf; returns the worst error. */
static double
grad_check (const char *what, Case *c, BuildFunc build)
{
  DfGraph *rec = df_graph_new (TRUE), *plain = df_graph_new (FALSE);
  DfTensor *y;
  float *r;
  double worst = 0;

  for (int i = 0; i < c->n_t; i++)
    df_tensor_require_grad (c->t[i]);

  /* Analytic: seed dy = r and run the recorded backward steps. */
  y = build (rec, c);
  g_assert_true (y->requires_grad);
  r = g_new (float, y->size);
  for (gsize i = 0; i < y->size; i++)
    r[i] = (float) g_rand_double_range (rng, -1.0, 1.0);
  memcpy (df_tensor_grad (y), r, y->size * sizeof (float));
  df_graph_backward (rec);

  /* Numeric: central differences with the step actually taken in float. */
  for (int k = 0; k < c->n_t; k++)
    {
      DfTensor *t = c->t[k];
      double err = 0, top = 1e-6;
      double *num = g_new (double, t->size);

      for (gsize i = 0; i < t->size; i++)
        {
          float orig = t->data[i], hi, lo;
          double lp, lm;

          hi = orig + (float) GRAD_EPS;
          lo = orig - (float) GRAD_EPS;
          t->data[i] = hi;
          df_graph_reset (plain);
          lp = weighted_sum (build (plain, c), r);
          t->data[i] = lo;
          df_graph_reset (plain);
          lm = weighted_sum (build (plain, c), r);
          t->data[i] = orig;
          num[i] = (lp - lm) / ((double) hi - lo);
          top = MAX (top, fabs (num[i]));
        }
      for (gsize i = 0; i < t->size; i++)
        err = MAX (err, fabs (t->grad[i] - num[i]));
      err /= top;
      g_test_message ("%s: input %d worst relative grad error %.3g "
                      "(tolerance %.0g)", what, k, err, GRAD_TOL);
      worst = MAX (worst, err);
      g_free (num);
    }

  g_free (r);
  df_graph_free (rec);
  df_graph_free (plain);
  return worst;
}

static void
assert_grad (const char *what, Case *c, BuildFunc build)
{
  g_assert_cmpfloat (grad_check (what, c, build), <=, GRAD_TOL);
}

/* ---- conv2d ---- */

static void
conv_ref (const DfTensor *x, const DfTensor *w, const DfTensor *b, int stride,
          int pl, int ph, double *y, int *ho_out, int *wo_out)
{
  int n = x->shape[0], ci = x->shape[1], h = x->shape[2], wd = x->shape[3];
  int co = w->shape[0], k = w->shape[2];
  int ho = (h + pl + ph - k) / stride + 1, wo = (wd + pl + ph - k) / stride + 1;

  for (int s = 0; s < n; s++)
    for (int o = 0; o < co; o++)
      for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < wo; ox++)
          {
            double sum = b != NULL ? b->data[o] : 0;

            for (int c = 0; c < ci; c++)
              for (int i = 0; i < k; i++)
                for (int j = 0; j < k; j++)
                  {
                    int iy = oy * stride - pl + i, ix = ox * stride - pl + j;

                    if (iy < 0 || iy >= h || ix < 0 || ix >= wd)
                      continue;
                    sum += (double) x->data[((s * ci + c) * h + iy) * wd + ix]
                           * w->data[((o * ci + c) * k + i) * k + j];
                  }
            y[((s * co + o) * ho + oy) * wo + ox] = sum;
          }
  *ho_out = ho;
  *wo_out = wo;
}

static DfTensor *
build_conv (DfGraph *g, Case *c)
{
  return df_conv2d (g, c->t[0], c->t[1], c->n_t > 2 ? c->t[2] : NULL,
                    c->stride, c->pad_lo, c->pad_hi);
}

typedef struct {
  int n, ci, h, w, co, k, stride, pl, ph;
  gboolean bias;
} ConvConf;

static const ConvConf conv_confs[] = {
  { 2, 3, 7, 6, 4, 3, 1, 1, 1, TRUE },   /* resnet conv, odd sizes */
  { 2, 3, 7, 6, 4, 3, 2, 0, 1, TRUE },   /* downsampler, padding (0,1) */
  { 1, 2, 8, 5, 3, 3, 2, 1, 1, FALSE },  /* stride 2, symmetric pad */
  { 2, 5, 4, 3, 3, 1, 1, 0, 0, TRUE },   /* 1x1 shortcut (no im2col) */
  { 1, 2, 5, 5, 2, 4, 1, 2, 1, TRUE },   /* even kernel, asymmetric pad */
  { 19, 2, 4, 3, 3, 3, 1, 1, 1, TRUE },  /* dW summed over two runs of samples */
  { 2, 3, 14, 16, 4, 3, 1, 1, 1, TRUE }, /* Winograd: even, rows of 14+ */
  { 1, 3, 28, 28, 2, 3, 1, 1, 1, FALSE },/* Winograd, one unit a sample */
  { 1, 2, 34, 34, 2, 3, 1, 1, 1, TRUE }, /* Winograd, a shorter last band */
  { 1, 1, 66, 16, 2, 3, 1, 1, 1, TRUE }, /* Winograd, h != w, two bands */
  { 19, 1, 14, 14, 2, 3, 1, 1, 1, TRUE },/* Winograd dW in three runs */
  { 2, 3, 7, 7, 4, 3, 1, 1, 1, TRUE },   /* Winograd, odd: tiles cropped */
  { 1, 2, 9, 8, 3, 3, 1, 1, 1, FALSE },  /* Winograd, odd h, even w */
  { 2, 2, 8, 11, 3, 3, 1, 1, 1, TRUE },  /* Winograd, even h, odd w */
  { 19, 2, 7, 7, 3, 3, 1, 1, 1, TRUE },  /* Winograd dW, samples grouped */
  { 2, 2, 6, 6, 3, 3, 1, 1, 1, TRUE },   /* rows under 7: direct 3x3 */
  { 2, 2, 3, 9, 3, 3, 1, 1, 1, TRUE },   /* Winograd, 3 rows of 9 */
  { 1, 2, 1, 8, 2, 3, 1, 1, 1, FALSE },  /* Winograd, one row */
  { 1, 2, 16, 16, 3, 5, 1, 2, 2, TRUE }, /* 5x5, wide rows: shifted form */
  /* Channels in 16s: F(4x4, 3x3) */
  { 2, 16, 14, 14, 32, 3, 1, 1, 1, TRUE },/* tiles cropped, units of 2 */
  { 3, 32, 7, 7, 16, 3, 1, 1, 1, TRUE }, /* a unit of 8 shared by threads */
  { 1, 16, 28, 28, 16, 3, 1, 1, 1, FALSE },/* a unit a sample */
  { 2, 16, 9, 11, 16, 3, 1, 1, 1, TRUE },/* odd, h != w, pixels not in 16s */
  { 19, 16, 7, 7, 16, 3, 1, 1, 1, TRUE },/* dW in three runs of groups */
  { 1, 16, 1, 8, 16, 3, 1, 1, 1, FALSE },/* one row */
};

static void
conv_case (Case *c, const ConvConf *f)
{
  memset (c, 0, sizeof *c);
  c->t[0] = random_4d (f->n, f->ci, f->h, f->w);
  c->t[1] = random_4d (f->co, f->ci, f->k, f->k);
  c->n_t = 2;
  if (f->bias)
    c->t[c->n_t++] = random_nd (1, f->co, 0, 0);
  c->stride = f->stride;
  c->pad_lo = f->pl;
  c->pad_hi = f->ph;
}

/* A convolution with a per-sample channel term: t[3] [N,Co]. */
static DfTensor *
build_conv_emb (DfGraph *g, Case *c)
{
  return df_conv2d_emb (g, c->t[0], c->t[1], c->t[2], c->t[3], c->stride,
                        c->pad_lo, c->pad_hi);
}

static DfTensor *
build_conv_then_emb (DfGraph *g, Case *c)
{
  return df_add_channel (g, df_conv2d (g, c->t[0], c->t[1], c->t[2],
                                       c->stride, c->pad_lo, c->pad_hi),
                         c->t[3]);
}

/* A convolution with a residual: t[3] has the output's shape. */
static DfTensor *
build_conv_add (DfGraph *g, Case *c)
{
  return df_conv2d_add (g, c->t[0], c->t[1], c->t[2], c->t[3], c->stride,
                        c->pad_lo, c->pad_hi);
}

static DfTensor *
build_conv_then_add (DfGraph *g, Case *c)
{
  return df_add (g, c->t[3], df_conv2d (g, c->t[0], c->t[1], c->t[2],
                                        c->stride, c->pad_lo, c->pad_hi));
}

/* The residual is the input itself (a resnet without a shortcut conv). */
static DfTensor *
build_conv_add_self (DfGraph *g, Case *c)
{
  return df_conv2d_add (g, c->t[0], c->t[1], c->t[2], c->t[0], 1, 1, 1);
}

static DfTensor *
build_conv_then_add_self (DfGraph *g, Case *c)
{
  return df_add (g, c->t[0], df_conv2d (g, c->t[0], c->t[1], c->t[2], 1, 1,
                                        1));
}

/* The same with the batched tensors first: x, e, w, b. */
static DfTensor *
build_conv_emb_batched_first (DfGraph *g, Case *c)
{
  return df_conv2d_emb (g, c->t[0], c->t[2], c->t[3], c->t[1], 1, 1, 1);
}

/* x, res, w, b. */
static DfTensor *
build_conv_add_batched_first (DfGraph *g, Case *c)
{
  return df_conv2d_add (g, c->t[0], c->t[2], c->t[3], c->t[1], 1, 1, 1);
}

static void
conv_emb_case (Case *c, const ConvConf *f)
{
  conv_case (c, f);
  g_assert_cmpint (c->n_t, ==, 3);
  c->t[c->n_t++] = random_nd (2, f->n, f->co, 0);
}

/* Whether f's convolution takes the Winograd form (ops.c's conv_winograd),
 * and the F(4x4, 3x3) one (conv_winograd4); check_winograd_gemms then
 * checks that it did. */
static gboolean
conv_is_winograd (const ConvConf *f)
{
  return f->k == 3 && f->stride == 1 && f->pl == 1 && f->ph == 1
         && f->w >= 7;
}

static gboolean
conv_is_winograd4 (const ConvConf *f)
{
  return conv_is_winograd (f) && f->ci % 16 == 0 && f->co % 16 == 0;
}

/* The GEMMs of a Winograd forward.  F(2x2): 16 a unit, each [Co,Ci] x
 * [Ci,tiles], their N summing to 16 times every sample's tiles however the
 * bands cut them.  F(4x4): 36 a sample, each [tiles,Ci] x [Ci,Co] over
 * its 4x4 tiles.  (The direct forms' GEMMs are other shapes.) */
static void
check_winograd_gemms (const ConvConf *f, GArray *calls)
{
  gsize tiles = 0;

  if (conv_is_winograd4 (f))
    {
      g_assert_cmpint (calls->len, ==, 36 * f->n);
      for (guint i = 0; i < calls->len; i++)
        {
          DfGemmCall *c = &g_array_index (calls, DfGemmCall, i);

          g_assert_cmpint (c->M, ==, ((f->h + 3) / 4) * ((f->w + 3) / 4));
          g_assert_cmpint (c->N, ==, f->co);
          g_assert_cmpint (c->K, ==, f->ci);
        }
      return;
    }
  g_assert_cmpint (calls->len % 16, ==, 0);
  for (guint i = 0; i < calls->len; i++)
    {
      DfGemmCall *c = &g_array_index (calls, DfGemmCall, i);

      g_assert_cmpint (c->M, ==, f->co);
      g_assert_cmpint (c->K, ==, f->ci);
      tiles += c->N;
    }
  g_assert_cmpint (tiles, ==,
                   (gsize) 16 * f->n * ((f->h + 1) / 2) * ((f->w + 1) / 2));
}

static void
test_conv_forward (void)
{
  for (guint i = 0; i < G_N_ELEMENTS (conv_confs); i++)
    {
      const ConvConf *f = &conv_confs[i];
      DfGraph *g = df_graph_new (FALSE);
      Case c;
      DfTensor *y;
      GArray *calls;
      double *ref;
      int ho, wo;
      char *what;

      conv_case (&c, f);
      ref = g_new (double, (gsize) f->n * f->co * (f->h + f->pl + f->ph)
                           * (f->w + f->pl + f->ph));
      conv_ref (c.t[0], c.t[1], f->bias ? c.t[2] : NULL, f->stride, f->pl,
                f->ph, ref, &ho, &wo);
      calls = g_array_new (FALSE, FALSE, sizeof (DfGemmCall));
      df_blas_trace (calls);
      y = build_conv (g, &c);
      df_blas_trace (NULL);
      if (conv_is_winograd (f))
        check_winograd_gemms (f, calls);
      g_array_unref (calls);
      g_assert_cmpint (y->ndim, ==, 4);
      g_assert_cmpint (y->shape[0], ==, f->n);
      g_assert_cmpint (y->shape[1], ==, f->co);
      g_assert_cmpint (y->shape[2], ==, ho);
      g_assert_cmpint (y->shape[3], ==, wo);
      what = g_strdup_printf ("conv %d x %d x %dx%d -> %d, k%d s%d pad "
                              "(%d,%d)%s", f->n, f->ci, f->h, f->w, f->co,
                              f->k, f->stride, f->pl, f->ph,
                              conv_is_winograd4 (f) ? ", Winograd F(4x4)"
                              : conv_is_winograd (f) ? ", Winograd" : "");
      assert_forward (what, y, ref, FWD_TOL);
      g_free (what);
      g_free (ref);
      case_free (&c);
      df_graph_free (g);
    }
}

static void
test_conv_grad (void)
{
  for (guint i = 0; i < G_N_ELEMENTS (conv_confs); i++)
    {
      const ConvConf *f = &conv_confs[i];
      Case c;
      char *what;

      conv_case (&c, f);
      what = g_strdup_printf ("conv %d x %d x %dx%d -> %d, k%d s%d pad "
                              "(%d,%d)%s", f->n, f->ci, f->h, f->w, f->co,
                              f->k, f->stride, f->pl, f->ph,
                              conv_is_winograd4 (f) ? ", Winograd F(4x4)"
                              : conv_is_winograd (f) ? ", Winograd" : "");
      assert_grad (what, &c, build_conv);
      g_free (what);
      case_free (&c);
    }
}

/* The Winograd forms' gradients against the exact ones in double: dx =
 * the transposed convolution of dY, dW = the correlation of x with dY,
 * db = dY's sums.  Finite differences (test_conv_grad) see errors above
 * their own noise of about 1e-4; this sees the transforms' rounding. */
static void
test_conv_grad_exact (void)
{
  for (guint i = 0; i < G_N_ELEMENTS (conv_confs); i++)
    {
      const ConvConf *f = &conv_confs[i];
      DfGraph *g;
      Case c;
      DfTensor *x, *w, *y;
      double *dx, *dw, *db, top_x = 1e-9, top_w = 1e-9, top_b = 1e-9;
      double err_x = 0, err_w = 0, err_b = 0;
      float *dy;
      int h = f->h, wd = f->w;

      if (!conv_is_winograd (f))
        continue;
      conv_case (&c, f);
      x = c.t[0];
      w = c.t[1];
      for (int t = 0; t < c.n_t; t++)
        df_tensor_require_grad (c.t[t]);
      g = df_graph_new (TRUE);
      y = build_conv (g, &c);
      dy = df_tensor_grad (y);
      for (gsize q = 0; q < y->size; q++)
        dy[q] = (float) g_rand_double_range (rng, -1.0, 1.0);
      df_graph_backward (g);

      dx = g_new0 (double, x->size);
      dw = g_new0 (double, w->size);
      db = g_new0 (double, f->co);
      for (int s = 0; s < f->n; s++)
        for (int o = 0; o < f->co; o++)
          for (int oy = 0; oy < h; oy++)
            for (int ox = 0; ox < wd; ox++)
              {
                double d = dy[((s * f->co + o) * h + oy) * wd + ox];

                db[o] += d;
                for (int ch = 0; ch < f->ci; ch++)
                  for (int a = 0; a < 3; a++)
                    for (int b = 0; b < 3; b++)
                      {
                        int iy = oy + a - 1, ix = ox + b - 1;
                        gsize xi = ((gsize) (s * f->ci + ch) * h + iy) * wd
                                   + ix;
                        gsize wi = ((gsize) (o * f->ci + ch) * 3 + a) * 3 + b;

                        if (iy < 0 || iy >= h || ix < 0 || ix >= wd)
                          continue;
                        dx[xi] += d * w->data[wi];
                        dw[wi] += d * x->data[xi];
                      }
              }
      for (gsize q = 0; q < x->size; q++)
        {
          top_x = MAX (top_x, fabs (dx[q]));
          err_x = MAX (err_x, fabs (dx[q] - x->grad[q]));
        }
      for (gsize q = 0; q < w->size; q++)
        {
          top_w = MAX (top_w, fabs (dw[q]));
          err_w = MAX (err_w, fabs (dw[q] - w->grad[q]));
        }
      for (int o = 0; f->bias && o < f->co; o++)
        {
          top_b = MAX (top_b, fabs (db[o]));
          err_b = MAX (err_b, fabs (db[o] - c.t[2]->grad[o]));
        }
      g_test_message ("conv %d x %d x %dx%d -> %d%s: worst gradient error "
                      "dx %.3g, dW %.3g, db %.3g (of the largest)", f->n,
                      f->ci, h, wd, f->co,
                      conv_is_winograd4 (f) ? ", F(4x4)" : "",
                      err_x / top_x, err_w / top_w, err_b / top_b);
      g_assert_cmpfloat (err_x / top_x, <=, FWD_TOL);
      g_assert_cmpfloat (err_w / top_w, <=, FWD_TOL);
      g_assert_cmpfloat (err_b / top_b, <=, FWD_TOL);
      g_free (dx);
      g_free (dw);
      g_free (db);
      df_graph_free (g);
      case_free (&c);
    }
}

/* ---- group norm ---- */

static void
group_norm_ref (const DfTensor *x, const DfTensor *gamma, const DfTensor *beta,
                int groups, double eps, double *y)
{
  int n = x->shape[0], ch = x->shape[1], cpg = ch / groups;
  gsize s = x->size / (n * ch), m = cpg * s;

  for (int ng = 0; ng < n * groups; ng++)
    {
      const float *xg = x->data + ng * m;
      double mean = 0, var = 0;

      for (gsize i = 0; i < m; i++)
        mean += xg[i];
      mean /= m;
      for (gsize i = 0; i < m; i++)
        var += (xg[i] - mean) * (xg[i] - mean);
      var /= m;
      for (gsize i = 0; i < m; i++)
        {
          int c = (ng % groups) * cpg + i / s;

          y[ng * m + i] = (xg[i] - mean) / sqrt (var + eps) * gamma->data[c]
                          + beta->data[c];
        }
    }
}

static DfTensor *
build_group_norm (DfGraph *g, Case *c)
{
  return df_group_norm (g, c->t[0], c->t[1], c->t[2], c->groups, c->eps);
}

static DfTensor *
build_group_norm_silu (DfGraph *g, Case *c)
{
  return df_group_norm_silu (g, c->t[0], c->t[1], c->t[2], c->groups,
                             c->eps);
}

static DfTensor *
build_group_norm_then_silu (DfGraph *g, Case *c)
{
  return df_silu (g, build_group_norm (g, c));
}

static void
group_norm_case (Case *c, int n, int ch, int h, int w, int groups)
{
  memset (c, 0, sizeof *c);
  c->t[0] = random_4d (n, ch, h, w);
  c->t[1] = random_nd (1, ch, 0, 0);
  c->t[2] = random_nd (1, ch, 0, 0);
  c->n_t = 3;
  c->groups = groups;
  c->eps = 1e-5f;
}

static void
test_group_norm_forward (void)
{
  DfGraph *g = df_graph_new (FALSE);
  Case c;
  double *ref;

  /* 3 groups of 2 channels, odd spatial size, an offset mean (the naive
   * E[x^2] - E[x]^2 would lose digits here) */
  group_norm_case (&c, 2, 6, 5, 3, 3);
  for (gsize i = 0; i < c.t[0]->size; i++)
    c.t[0]->data[i] += 100.0f;
  ref = g_new (double, c.t[0]->size);
  group_norm_ref (c.t[0], c.t[1], c.t[2], 3, 1e-5, ref);
  assert_forward ("group norm", build_group_norm (g, &c), ref, FWD_TOL);
  g_free (ref);
  case_free (&c);
  df_graph_free (g);
}

static void
test_group_norm_grad (void)
{
  Case c;

  group_norm_case (&c, 2, 6, 3, 3, 3);
  assert_grad ("group norm 3 groups", &c, build_group_norm);
  case_free (&c);
  group_norm_case (&c, 1, 4, 2, 3, 1);
  assert_grad ("group norm 1 group", &c, build_group_norm);
  case_free (&c);
}

static void
test_group_norm_silu_forward (void)
{
  DfGraph *g = df_graph_new (FALSE);
  Case c;
  double *ref;

  group_norm_case (&c, 2, 6, 5, 3, 3);
  ref = g_new (double, c.t[0]->size);
  group_norm_ref (c.t[0], c.t[1], c.t[2], 3, 1e-5, ref);
  for (gsize i = 0; i < c.t[0]->size; i++)
    ref[i] = ref[i] / (1 + exp (-ref[i]));
  assert_forward ("group norm + silu", build_group_norm_silu (g, &c), ref,
                  FWD_TOL);
  g_free (ref);
  case_free (&c);
  df_graph_free (g);
}

static void
test_group_norm_silu_grad (void)
{
  Case c;

  group_norm_case (&c, 2, 6, 3, 3, 3);
  assert_grad ("group norm + silu", &c, build_group_norm_silu);
  case_free (&c);
}

/* ---- linear ---- */

static DfTensor *
build_linear (DfGraph *g, Case *c)
{
  return df_linear (g, c->t[0], c->t[1], c->n_t > 2 ? c->t[2] : NULL);
}

static void
linear_case (Case *c, int ndim, int n, int rows, int in, int out,
             gboolean bias)
{
  memset (c, 0, sizeof *c);
  c->t[0] = ndim == 2 ? random_nd (2, n, in, 0) : random_nd (3, n, rows, in);
  c->t[1] = random_nd (2, out, in, 0);
  c->n_t = 2;
  if (bias)
    c->t[c->n_t++] = random_nd (1, out, 0, 0);
}

static void
test_linear_forward (void)
{
  /* [N,I] (per-row loops) and [N,L,I] (one GEMM a sample) */
  for (int ndim = 2; ndim <= 3; ndim++)
    {
      DfGraph *g = df_graph_new (FALSE);
      Case c;
      DfTensor *y;
      gsize rows;
      double *ref;

      linear_case (&c, ndim, 3, 9, 7, 5, TRUE);
      y = build_linear (g, &c);
      rows = c.t[0]->size / 7;
      g_assert_cmpint (y->ndim, ==, ndim);
      g_assert_cmpint (y->shape[ndim - 1], ==, 5);
      ref = g_new (double, rows * 5);
      for (gsize i = 0; i < rows; i++)
        for (int o = 0; o < 5; o++)
          {
            double sum = c.t[2]->data[o];

            for (int k = 0; k < 7; k++)
              sum += (double) c.t[0]->data[i * 7 + k] * c.t[1]->data[o * 7 + k];
            ref[i * 5 + o] = sum;
          }
      assert_forward (ndim == 2 ? "linear [N,I]" : "linear [N,L,I]", y, ref,
                      FWD_TOL);
      g_free (ref);
      case_free (&c);
      df_graph_free (g);
    }
}

static void
test_linear_grad (void)
{
  Case c;

  linear_case (&c, 2, 3, 1, 7, 5, TRUE);
  assert_grad ("linear [N,I]", &c, build_linear);
  case_free (&c);
  linear_case (&c, 3, 2, 9, 6, 4, TRUE);
  assert_grad ("linear [N,L,I]", &c, build_linear);
  case_free (&c);
  linear_case (&c, 3, 2, 8, 3, 5, FALSE);
  assert_grad ("linear [N,L,I] no bias", &c, build_linear);
  case_free (&c);
}

/* ---- attention ---- */

static void
attention_ref (const DfTensor *q, const DfTensor *k, const DfTensor *v,
               int heads, double *y)
{
  int n = q->shape[0], lq = q->shape[1], lk = k->shape[1], d = q->shape[2];
  int dh = d / heads;
  double *p = g_new (double, lk);

  for (int s = 0; s < n; s++)
    for (int h = 0; h < heads; h++)
      for (int i = 0; i < lq; i++)
        {
          double m = -INFINITY, sum = 0;

          for (int j = 0; j < lk; j++)
            {
              double dot = 0;

              for (int e = 0; e < dh; e++)
                dot += (double) q->data[(s * lq + i) * d + h * dh + e]
                       * k->data[(s * lk + j) * d + h * dh + e];
              p[j] = dot / sqrt (dh);
              m = MAX (m, p[j]);
            }
          for (int j = 0; j < lk; j++)
            sum += p[j] = exp (p[j] - m);
          for (int e = 0; e < dh; e++)
            {
              double acc = 0;

              for (int j = 0; j < lk; j++)
                acc += p[j] / sum * v->data[(s * lk + j) * d + h * dh + e];
              y[(s * lq + i) * d + h * dh + e] = acc;
            }
        }
  g_free (p);
}

static DfTensor *
build_attention (DfGraph *g, Case *c)
{
  return df_attention (g, c->t[0], c->t[1], c->t[2], c->heads);
}

static void
attention_case (Case *c, int n, int lq, int lk, int d, int heads)
{
  memset (c, 0, sizeof *c);
  c->t[0] = random_nd (3, n, lq, d);
  c->t[1] = random_nd (3, n, lk, d);
  c->t[2] = random_nd (3, n, lk, d);
  fill_random (c->t[0], 2.0);     /* peakier softmax */
  c->n_t = 3;
  c->heads = heads;
}

static void
test_attention_forward (void)
{
  static const int confs[][5] = {
    { 2, 5, 5, 6, 2 }, { 1, 9, 9, 8, 1 }, { 2, 4, 7, 6, 3 },
  };

  for (guint i = 0; i < G_N_ELEMENTS (confs); i++)
    {
      DfGraph *g = df_graph_new (FALSE);
      Case c;
      double *ref;
      char *what;

      attention_case (&c, confs[i][0], confs[i][1], confs[i][2], confs[i][3],
                      confs[i][4]);
      ref = g_new (double, c.t[0]->size);
      attention_ref (c.t[0], c.t[1], c.t[2], c.heads, ref);
      what = g_strdup_printf ("attention L %d/%d D %d heads %d", confs[i][1],
                              confs[i][2], confs[i][3], confs[i][4]);
      assert_forward (what, build_attention (g, &c), ref, FWD_TOL);
      g_free (what);
      g_free (ref);
      case_free (&c);
      df_graph_free (g);
    }
}

static void
test_attention_grad (void)
{
  Case c;

  attention_case (&c, 2, 5, 5, 6, 2);
  assert_grad ("attention 2 heads", &c, build_attention);
  case_free (&c);
  attention_case (&c, 1, 3, 6, 4, 1);
  assert_grad ("attention Lq != Lk", &c, build_attention);
  case_free (&c);
}

/* Self-attention on one tensor: its grad gathers all three paths. */
static DfTensor *
build_self_attention (DfGraph *g, Case *c)
{
  return df_attention (g, c->t[0], c->t[0], c->t[0], c->heads);
}

static void
test_attention_grad_shared (void)
{
  Case c = { 0 };

  c.t[0] = random_nd (3, 1, 5, 4);
  c.n_t = 1;
  c.heads = 2;
  assert_grad ("attention q = k = v", &c, build_self_attention);
  case_free (&c);
}

/* ---- elementwise ---- */

static DfTensor *
build_silu (DfGraph *g, Case *c)
{
  return df_silu (g, c->t[0]);
}

static DfTensor *
build_add (DfGraph *g, Case *c)
{
  return df_add (g, c->t[0], c->t[1]);
}

static DfTensor *
build_scale (DfGraph *g, Case *c)
{
  return df_scale (g, c->t[0], c->s);
}

static DfTensor *
build_add_channel (DfGraph *g, Case *c)
{
  return df_add_channel (g, c->t[0], c->t[1]);
}

static void
test_elementwise_forward (void)
{
  DfGraph *g = df_graph_new (FALSE);
  DfTensor *a = random_4d (2, 3, 4, 5), *b = random_4d (2, 3, 4, 5);
  DfTensor *e = random_nd (2, 2, 3, 0);
  DfTensor *y;
  double *ref = g_new (double, a->size);

  y = df_silu (g, a);
  for (gsize i = 0; i < a->size; i++)
    ref[i] = a->data[i] / (1.0 + exp (-(double) a->data[i]));
  assert_forward ("silu", y, ref, FWD_TOL);

  y = df_add (g, a, b);
  for (gsize i = 0; i < a->size; i++)
    ref[i] = (double) a->data[i] + b->data[i];
  assert_forward ("add", y, ref, FWD_TOL);

  y = df_scale (g, a, 0.375f);
  for (gsize i = 0; i < a->size; i++)
    ref[i] = 0.375 * a->data[i];
  assert_forward ("scale", y, ref, FWD_TOL);

  y = df_add_channel (g, a, e);
  for (gsize i = 0; i < a->size; i++)
    ref[i] = (double) a->data[i] + e->data[i / 20];
  assert_forward ("add channel", y, ref, FWD_TOL);

  g_free (ref);
  df_tensor_free (a);
  df_tensor_free (b);
  df_tensor_free (e);
  df_graph_free (g);
}

static void
test_elementwise_grad (void)
{
  Case c = { 0 };

  c.t[0] = random_4d (2, 3, 3, 2);
  c.t[1] = random_4d (2, 3, 3, 2);
  c.n_t = 1;
  c.t[0]->data[0] = 0.0f;
  assert_grad ("silu", &c, build_silu);
  c.n_t = 2;
  assert_grad ("add", &c, build_add);
  c.n_t = 1;
  c.s = -1.75f;
  assert_grad ("scale", &c, build_scale);
  df_tensor_free (c.t[1]);
  c.t[1] = random_nd (2, 2, 3, 0);
  c.n_t = 2;
  assert_grad ("add channel", &c, build_add_channel);
  case_free (&c);
}

/* ---- reshapes, embedding, mean ---- */

static DfTensor *
build_concat (DfGraph *g, Case *c)
{
  return df_concat (g, c->t[0], c->t[1]);
}

static DfTensor *
build_upsample (DfGraph *g, Case *c)
{
  return df_upsample2x (g, c->t[0]);
}

static DfTensor *
build_to_tokens (DfGraph *g, Case *c)
{
  return df_to_tokens (g, c->t[0]);
}

static DfTensor *
build_from_tokens (DfGraph *g, Case *c)
{
  return df_from_tokens (g, c->t[0], c->h, c->w);
}

static DfTensor *
build_embedding (DfGraph *g, Case *c)
{
  return df_embedding (g, c->t[0], c->ids, c->n_ids);
}

static DfTensor *
build_mean_hw (DfGraph *g, Case *c)
{
  return df_mean_hw (g, c->t[0]);
}

static void
test_shape_forward (void)
{
  DfGraph *g = df_graph_new (FALSE);
  DfTensor *a = random_4d (2, 3, 4, 5), *b = random_4d (2, 2, 4, 5);
  DfTensor *table = random_nd (2, 4, 3, 0);
  DfTensor *y, *t;
  int ids[3] = { 2, 0, 2 };
  double *ref = g_new (double, 4 * a->size);

  /* concat: sample n is a's channels then b's */
  y = df_concat (g, a, b);
  g_assert_cmpint (y->shape[1], ==, 5);
  for (int n = 0; n < 2; n++)
    for (int i = 0; i < 100; i++)
      ref[n * 100 + i] = i < 60 ? a->data[n * 60 + i]
                                : b->data[n * 40 + i - 60];
  assert_forward ("concat", y, ref, 0);

  /* upsample: y[2i+a, 2j+b] = x[i, j] */
  y = df_upsample2x (g, a);
  g_assert_cmpint (y->shape[2], ==, 8);
  g_assert_cmpint (y->shape[3], ==, 10);
  for (int nc = 0; nc < 6; nc++)
    for (int i = 0; i < 8; i++)
      for (int j = 0; j < 10; j++)
        ref[(nc * 8 + i) * 10 + j] = a->data[(nc * 4 + i / 2) * 5 + j / 2];
  assert_forward ("upsample", y, ref, 0);

  /* tokens: [N,C,H,W] -> [N,L,C] and back */
  t = df_to_tokens (g, a);
  g_assert_cmpint (t->ndim, ==, 3);
  g_assert_cmpint (t->shape[1], ==, 20);
  g_assert_cmpint (t->shape[2], ==, 3);
  for (int n = 0; n < 2; n++)
    for (int l = 0; l < 20; l++)
      for (int c = 0; c < 3; c++)
        ref[(n * 20 + l) * 3 + c] = a->data[(n * 3 + c) * 20 + l];
  assert_forward ("to tokens", t, ref, 0);
  y = df_from_tokens (g, t, 4, 5);
  g_assert_true (df_tensor_same_shape (y, a));
  g_assert_cmpmem (y->data, y->size * 4, a->data, a->size * 4);

  /* embedding rows, repeated ids */
  y = df_embedding (g, table, ids, 3);
  g_assert_cmpint (y->ndim, ==, 2);
  g_assert_cmpint (y->shape[0], ==, 3);
  g_assert_cmpint (y->shape[1], ==, 3);
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 3; j++)
      ref[i * 3 + j] = table->data[ids[i] * 3 + j];
  assert_forward ("embedding", y, ref, 0);

  /* mean over H, W */
  y = df_mean_hw (g, a);
  g_assert_cmpint (y->ndim, ==, 2);
  for (int i = 0; i < 6; i++)
    {
      ref[i] = 0;
      for (int q = 0; q < 20; q++)
        ref[i] += a->data[i * 20 + q] / 20.0;
    }
  assert_forward ("mean hw", y, ref, FWD_TOL);

  g_free (ref);
  df_tensor_free (a);
  df_tensor_free (b);
  df_tensor_free (table);
  df_graph_free (g);
}

static void
test_shape_grad (void)
{
  Case c = { 0 };

  c.t[0] = random_4d (2, 3, 3, 2);
  c.t[1] = random_4d (2, 2, 3, 2);
  c.n_t = 2;
  assert_grad ("concat", &c, build_concat);
  c.n_t = 1;
  assert_grad ("upsample", &c, build_upsample);
  assert_grad ("to tokens", &c, build_to_tokens);
  assert_grad ("mean hw", &c, build_mean_hw);
  c.n_t = 2;
  case_free (&c);

  memset (&c, 0, sizeof c);
  c.t[0] = random_nd (3, 2, 6, 3);
  c.n_t = 1;
  c.h = 2;
  c.w = 3;
  assert_grad ("from tokens", &c, build_from_tokens);
  case_free (&c);

  memset (&c, 0, sizeof c);
  c.t[0] = random_nd (2, 5, 4, 0);
  c.n_t = 1;
  c.ids[0] = 3;
  c.ids[1] = 1;
  c.ids[2] = 3;
  c.ids[3] = 0;
  c.n_ids = 4;
  assert_grad ("embedding", &c, build_embedding);
  case_free (&c);
}

/* ---- losses ---- */

typedef double (*LossFunc) (DfGraph *g, DfTensor *z, const float *target,
                            const int *labels);

static double
loss_mse (DfGraph *g, DfTensor *z, const float *target, const int *labels)
{
  return df_loss_mse (g, z, target);
}

static double
loss_ce (DfGraph *g, DfTensor *z, const float *target, const int *labels)
{
  return df_loss_cross_entropy (g, z, labels);
}

static double
loss_log_prob (DfGraph *g, DfTensor *z, const float *target,
               const int *labels)
{
  return df_seed_log_prob (g, z, labels);
}

/* The seeded grad is d value / d z (for all three, as the value is
 * returned: mean loss, mean loss, and the log probability ascended). */
static void
check_loss (const char *what, LossFunc f)
{
  DfGraph *rec = df_graph_new (TRUE), *plain = df_graph_new (FALSE);
  DfTensor *z = random_nd (2, 3, 5, 0);
  float target[15];
  int labels[3] = { 4, 0, 2 };
  double value, err = 0, top = 1e-6;

  for (int i = 0; i < 15; i++)
    target[i] = (float) g_rand_double_range (rng, -1, 1);
  fill_random (z, 3.0);
  df_tensor_require_grad (z);
  value = f (rec, z, target, labels);

  /* the value against double arithmetic */
  {
    double ref = 0;

    for (int n = 0; n < 3; n++)
      {
        const float *zr = z->data + n * 5;
        double m = -INFINITY, sum = 0, lp;

        for (int k = 0; k < 5; k++)
          m = MAX (m, zr[k]);
        for (int k = 0; k < 5; k++)
          sum += exp (zr[k] - m);
        lp = zr[labels[n]] - m - log (sum);
        if (f == loss_mse)
          for (int k = 0; k < 5; k++)
            ref += (zr[k] - target[n * 5 + k]) * (zr[k] - target[n * 5 + k])
                   / 15.0;
        else if (f == loss_ce)
          ref -= lp / 3.0;
        else
          ref += lp;
      }
    g_test_message ("%s: value %.9g, double reference %.9g", what, value,
                    ref);
    g_assert_cmpfloat (fabs (value - ref), <=, 1e-6 * (1 + fabs (ref)));
  }

  for (gsize i = 0; i < z->size; i++)
    {
      float orig = z->data[i], hi = orig + 1e-2f, lo = orig - 1e-2f;
      double lp, lm, num;

      z->data[i] = hi;
      lp = f (plain, z, target, labels);
      z->data[i] = lo;
      lm = f (plain, z, target, labels);
      z->data[i] = orig;
      num = (lp - lm) / ((double) hi - lo);
      top = MAX (top, fabs (num));
      err = MAX (err, fabs (num - z->grad[i]));
    }
  err /= top;
  g_test_message ("%s: worst relative grad error %.3g (tolerance %.0g)",
                  what, err, GRAD_TOL);
  g_assert_cmpfloat (err, <=, GRAD_TOL);

  df_tensor_free (z);
  df_graph_free (rec);
  df_graph_free (plain);
}

static void
test_loss_mse (void)
{
  check_loss ("mse", loss_mse);
}

static void
test_loss_cross_entropy (void)
{
  check_loss ("cross entropy", loss_ce);
}

static void
test_loss_log_prob (void)
{
  check_loss ("log prob", loss_log_prob);
}

/* ---- composite chain ---- */

/* silu (group_norm (conv (x))) + conv (x), then a linear over W */
static DfTensor *
build_chain (DfGraph *g, Case *c)
{
  DfTensor *h = df_conv2d (g, c->t[0], c->t[1], c->t[2], 1, 1, 1);
  DfTensor *n = df_group_norm (g, h, c->t[3], NULL, 2, 1e-5f);

  return df_add (g, df_silu (g, n), h);
}

static void
test_chain_grad (void)
{
  Case c = { 0 };

  c.t[0] = random_4d (2, 3, 5, 4);
  c.t[1] = random_4d (4, 3, 3, 3);
  c.t[2] = random_nd (1, 4, 0, 0);
  c.t[3] = random_nd (1, 4, 0, 0);
  c.n_t = 4;
  assert_grad ("conv -> group norm -> silu -> add", &c, build_chain);
  case_free (&c);
}

/* ---- fresh gradients ---- */

/* Each op on s = 1.5 x, a graph tensor: the first gradient into s is
 * stored (df_tensor_grad_fresh) rather than added to zeros, and an op that
 * takes s twice adds the second into the first. */
static DfTensor *
fresh_input (DfGraph *g, Case *c)
{
  return df_scale (g, c->t[0], 1.5f);
}

static DfTensor *
build_fresh_add (DfGraph *g, Case *c)
{
  DfTensor *s = fresh_input (g, c);

  return df_add (g, s, df_scale (g, s, 2.0f));
}

static DfTensor *
build_fresh_add_same (DfGraph *g, Case *c)
{
  DfTensor *s = fresh_input (g, c);

  return df_add (g, s, s);
}

static DfTensor *
build_fresh_concat_same (DfGraph *g, Case *c)
{
  DfTensor *s = fresh_input (g, c);

  return df_concat (g, s, s);
}

static DfTensor *
build_fresh_add_channel (DfGraph *g, Case *c)
{
  return df_add_channel (g, fresh_input (g, c), c->t[1]);
}

static DfTensor *
build_fresh_conv (DfGraph *g, Case *c)
{
  return df_conv2d (g, fresh_input (g, c), c->t[2], NULL, 1, 1, 1);
}

static DfTensor *
build_fresh_norm (DfGraph *g, Case *c)
{
  return df_group_norm_silu (g, fresh_input (g, c), NULL, NULL, 2, 1e-5f);
}

static DfTensor *
build_fresh_upsample (DfGraph *g, Case *c)
{
  return df_upsample2x (g, fresh_input (g, c));
}

static DfTensor *
build_fresh_tokens (DfGraph *g, Case *c)
{
  DfTensor *s = fresh_input (g, c);

  return df_from_tokens (g, df_to_tokens (g, s), s->shape[2], s->shape[3]);
}

static void
test_fresh_grad (void)
{
  static const struct {
    const char *name;
    BuildFunc   build;
  } ops[] = {
    { "add", build_fresh_add },
    { "add of one tensor twice", build_fresh_add_same },
    { "concat of one tensor twice", build_fresh_concat_same },
    { "add channel", build_fresh_add_channel },
    { "conv, Winograd", build_fresh_conv },
    { "group norm + silu", build_fresh_norm },
    { "upsample", build_fresh_upsample },
    { "tokens and back", build_fresh_tokens },
  };

  for (guint i = 0; i < G_N_ELEMENTS (ops); i++)
    {
      Case c = { 0 };
      char *what = g_strdup_printf ("%s into a fresh gradient", ops[i].name);

      c.t[0] = random_4d (2, 4, 7, 8);
      c.t[1] = random_nd (2, 2, 4, 0);
      c.t[2] = random_4d (3, 4, 3, 3);
      c.n_t = 3;
      assert_grad (what, &c, ops[i].build);
      g_free (what);
      case_free (&c);
    }
}

/* ---- the graph ---- */

static void
test_graph_reuse (void)
{
  DfGraph *g = df_graph_new (TRUE);
  Case c = { 0 };
  DfTensor *y[2], *x[2], *x0 = random_4d (2, 4, 6, 6);
  float *data[2], *grad[2];

  c.t[1] = random_4d (4, 4, 3, 3);
  c.t[2] = random_nd (1, 4, 0, 0);
  c.t[3] = random_nd (1, 4, 0, 0);
  c.n_t = 4;
  df_tensor_require_grad (c.t[1]);

  for (int pass = 0; pass < 2; pass++)
    {
      df_graph_reset (g);
      x[pass] = df_graph_tensor_4d (g, 2, 4, 6, 6);
      memcpy (x[pass]->data, x0->data, x0->size * sizeof (float));
      df_tensor_require_grad (x[pass]);
      c.t[0] = x[pass];
      y[pass] = build_chain (g, &c);
      data[pass] = y[pass]->data;
      df_loss_mse (g, y[pass], c.t[0]->data);
      df_graph_backward (g);
      grad[pass] = x[pass]->grad;
    }
  c.t[0] = NULL;

  /* same sequence -> same slots and the same buffers */
  g_assert_true (x[0] == x[1]);
  g_assert_true (y[0] == y[1]);
  g_assert_true (data[0] == data[1]);
  g_assert_true (grad[0] == grad[1]);

  /* a parameter's grad accumulates across passes: twice the first pass */
  {
    DfGraph *once = df_graph_new (TRUE);
    Case d = c;
    float *twice = g_memdup2 (c.t[1]->grad, c.t[1]->size * sizeof (float));
    double worst = 0, top = 1e-6;

    d.t[0] = df_graph_tensor_4d (once, 2, 4, 6, 6);
    memcpy (d.t[0]->data, x0->data, x0->size * sizeof (float));
    df_tensor_zero_grad (c.t[1]);
    df_loss_mse (once, build_chain (once, &d), d.t[0]->data);
    df_graph_backward (once);
    for (gsize i = 0; i < c.t[1]->size; i++)
      {
        worst = MAX (worst, fabs (twice[i] - 2 * c.t[1]->grad[i]));
        top = MAX (top, fabs (twice[i]));
      }
    worst /= top;
    g_test_message ("accumulated grad vs 2 x one pass: worst relative %.3g "
                    "(tolerance 1e-5)", worst);
    g_assert_cmpfloat (worst, <=, 1e-5);
    g_free (twice);
    df_graph_free (once);
  }

  for (int i = 1; i < 4; i++)
    df_tensor_free (c.t[i]);
  df_tensor_free (x0);
  df_graph_free (g);
}

static void
test_graph_no_record (void)
{
  DfGraph *g = df_graph_new (FALSE);
  DfTensor *x = random_4d (1, 2, 3, 3), *w = random_4d (2, 2, 3, 3);
  DfTensor *y;

  df_tensor_require_grad (w);
  y = df_silu (g, df_conv2d (g, x, w, NULL, 1, 1, 1));
  g_assert_false (df_graph_is_recording (g));
  g_assert_false (y->requires_grad);
  df_graph_backward (g);          /* nothing recorded: a no-op */
  for (gsize i = 0; i < w->size; i++)
    g_assert_cmpfloat (w->grad[i], ==, 0.0f);
  df_tensor_free (x);
  df_tensor_free (w);
  df_graph_free (g);
}

/* ---- invariance: batch size and thread count ---- */

typedef struct {
  const char *name;
  BuildFunc   build;
  Case        c;
  int         n_batched;        /* t[0..n_batched) carry the batch dim */
} InvCase;

/* Output, input grads and param grads of one recorded pass. */
typedef struct {
  float *y, *gx[4];
  gsize  ny;
} InvResult;

static InvResult
inv_run (Case *c, BuildFunc build, int n_batched, const float *seed)
{
  DfGraph *g = df_graph_new (TRUE);
  InvResult res = { 0 };
  DfTensor *y;

  for (int i = 0; i < c->n_t; i++)
    df_tensor_require_grad (c->t[i]);
  y = build (g, c);
  res.ny = y->size;
  res.y = g_memdup2 (y->data, y->size * sizeof (float));
  memcpy (df_tensor_grad (y), seed, y->size * sizeof (float));
  df_graph_backward (g);
  for (int i = 0; i < c->n_t; i++)
    res.gx[i] = g_memdup2 (c->t[i]->grad, c->t[i]->size * sizeof (float));
  df_graph_free (g);
  return res;
}

static void
inv_free (InvResult *r)
{
  g_free (r->y);
  for (int i = 0; i < 4; i++)
    g_free (r->gx[i]);
}

/* Sample `s` of batched tensor t as a batch of one. */
static DfTensor *
slice_sample (const DfTensor *t, int s)
{
  int shape[DF_MAX_DIMS];
  DfTensor *one;

  memcpy (shape, t->shape, sizeof shape);
  shape[0] = 1;
  one = df_tensor_new (t->ndim, shape);
  memcpy (one->data, t->data + s * one->size, one->size * sizeof (float));
  return one;
}

/* The invariance cases are large enough that OpenMP and OpenBLAS split. */
#define N_INV_CASES 19
static void
inv_cases (InvCase *cases, int *n)
{
  InvCase *k;

  *n = 0;

  k = &cases[(*n)++];
  k->name = "conv 3x3";
  k->build = build_conv;
  conv_case (&k->c, &(ConvConf) { 3, 16, 17, 15, 32, 3, 1, 1, 1, TRUE });
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "conv 3x3, batch 19";
  k->build = build_conv;
  conv_case (&k->c, &(ConvConf) { 19, 8, 9, 7, 12, 3, 1, 1, 1, TRUE });
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "conv 3x3 Winograd";
  k->build = build_conv;
  conv_case (&k->c, &(ConvConf) { 3, 16, 28, 28, 24, 3, 1, 1, 1, TRUE });
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "conv 3x3 Winograd, two bands";
  k->build = build_conv;
  conv_case (&k->c, &(ConvConf) { 3, 4, 34, 34, 6, 3, 1, 1, 1, TRUE });
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "conv 3x3 Winograd, batch 19";    /* dW in three runs (threads) */
  k->build = build_conv;
  conv_case (&k->c, &(ConvConf) { 19, 4, 14, 14, 6, 3, 1, 1, 1, TRUE });
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "conv 3x3 Winograd F(4x4)";
  k->build = build_conv;
  conv_case (&k->c, &(ConvConf) { 3, 16, 28, 28, 32, 3, 1, 1, 1, TRUE });
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "conv 3x3 Winograd F(4x4), units of 8 samples";
  k->build = build_conv;
  conv_case (&k->c, &(ConvConf) { 3, 32, 7, 7, 16, 3, 1, 1, 1, TRUE });
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "conv 3x3 Winograd F(4x4), batch 19"; /* dW: runs, groups */
  k->build = build_conv;
  conv_case (&k->c, &(ConvConf) { 19, 16, 9, 11, 16, 3, 1, 1, 1, TRUE });
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "conv stride 2";
  k->build = build_conv;
  conv_case (&k->c, &(ConvConf) { 3, 16, 16, 16, 24, 3, 2, 0, 1, TRUE });
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "conv 1x1";
  k->build = build_conv;
  conv_case (&k->c, &(ConvConf) { 3, 32, 12, 12, 48, 1, 1, 0, 0, TRUE });
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "group norm";
  k->build = build_group_norm;
  group_norm_case (&k->c, 3, 32, 16, 16, 8);
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "group norm + silu";
  k->build = build_group_norm_silu;
  group_norm_case (&k->c, 3, 32, 16, 16, 8);
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "conv 3x3 Winograd + channel term";
  k->build = build_conv_emb_batched_first;
  memset (&k->c, 0, sizeof k->c);
  k->c.t[0] = random_4d (3, 8, 14, 14);
  k->c.t[1] = random_nd (2, 3, 12, 0);
  k->c.t[2] = random_4d (12, 8, 3, 3);
  k->c.t[3] = random_nd (1, 12, 0, 0);
  k->c.n_t = 4;
  k->n_batched = 2;

  k = &cases[(*n)++];
  k->name = "conv 3x3 Winograd + residual";
  k->build = build_conv_add_batched_first;
  memset (&k->c, 0, sizeof k->c);
  k->c.t[0] = random_4d (3, 8, 14, 14);
  k->c.t[1] = random_4d (3, 12, 14, 14);
  k->c.t[2] = random_4d (12, 8, 3, 3);
  k->c.t[3] = random_nd (1, 12, 0, 0);
  k->c.n_t = 4;
  k->n_batched = 2;

  k = &cases[(*n)++];
  k->name = "conv 5x5, shifted form";
  k->build = build_conv;
  conv_case (&k->c, &(ConvConf) { 3, 8, 16, 16, 12, 5, 1, 2, 2, TRUE });
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "linear [N,I]";
  k->build = build_linear;
  linear_case (&k->c, 2, 3, 1, 256, 300, TRUE);
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "linear [N,L,I]";
  k->build = build_linear;
  linear_case (&k->c, 3, 3, 64, 96, 80, TRUE);
  k->n_batched = 1;

  k = &cases[(*n)++];
  k->name = "attention";
  k->build = build_attention;
  attention_case (&k->c, 3, 64, 64, 64, 2);
  k->n_batched = 3;

  k = &cases[(*n)++];
  k->name = "chain";
  k->build = build_chain;
  memset (&k->c, 0, sizeof k->c);
  k->c.t[0] = random_4d (3, 16, 16, 16);
  k->c.t[1] = random_4d (16, 16, 3, 3);
  k->c.t[2] = random_nd (1, 16, 0, 0);
  k->c.t[3] = random_nd (1, 16, 0, 0);
  k->c.n_t = 4;
  k->n_batched = 1;
  g_assert_cmpint (*n, <=, N_INV_CASES);
}

static float *
random_seed (gsize n)
{
  float *r = g_new (float, n);

  for (gsize i = 0; i < n; i++)
    r[i] = (float) g_rand_double_range (rng, -1, 1);
  return r;
}

/* The fused op gives the bits of the two it replaces, forward and
 * backward. */
static void
test_group_norm_silu_same (void)
{
  Case c;
  DfGraph *probe = df_graph_new (FALSE);
  InvResult fused, apart;
  float *seed;

  group_norm_case (&c, 3, 16, 7, 9, 4);
  seed = random_seed (build_group_norm (probe, &c)->size);
  df_graph_free (probe);
  fused = inv_run (&c, build_group_norm_silu, 1, seed);
  apart = inv_run (&c, build_group_norm_then_silu, 1, seed);
  g_assert_cmpmem (fused.y, fused.ny * 4, apart.y, apart.ny * 4);
  for (int t = 0; t < c.n_t; t++)
    g_assert_cmpmem (fused.gx[t], c.t[t]->size * 4, apart.gx[t],
                     c.t[t]->size * 4);
  inv_free (&fused);
  inv_free (&apart);
  g_free (seed);
  case_free (&c);
}

/* Both fused forms against the ops they replace: the same bits. */
static void
assert_same_bits (Case *c, BuildFunc fused_build, BuildFunc apart_build)
{
  DfGraph *probe = df_graph_new (FALSE);
  InvResult fused, apart;
  float *seed;

  seed = random_seed (apart_build (probe, c)->size);
  df_graph_free (probe);
  fused = inv_run (c, fused_build, 1, seed);
  apart = inv_run (c, apart_build, 1, seed);
  g_assert_cmpmem (fused.y, fused.ny * 4, apart.y, apart.ny * 4);
  for (int t = 0; t < c->n_t; t++)
    g_assert_cmpmem (fused.gx[t], c->t[t]->size * 4, apart.gx[t],
                     c->t[t]->size * 4);
  inv_free (&fused);
  inv_free (&apart);
  g_free (seed);
}

/* The fused convolution + channel term and convolution + residual
 * against the ops they replace: the same bits forward and backward, in the
 * Winograd and direct forms; and their gradients by differences. */
static void
test_conv_fused (void)
{
  static const ConvConf confs[] = {
    { 3, 4, 7, 9, 5, 3, 1, 1, 1, TRUE },   /* Winograd */
    { 2, 16, 9, 7, 16, 3, 1, 1, 1, TRUE }, /* Winograd F(4x4) */
    { 2, 3, 5, 5, 4, 3, 1, 1, 1, TRUE },   /* direct, rows under 7 */
    { 2, 3, 6, 6, 4, 1, 1, 0, 0, TRUE },   /* 1x1 */
    { 2, 3, 8, 8, 4, 3, 2, 0, 1, TRUE },   /* stride 2 */
  };

  for (guint i = 0; i < G_N_ELEMENTS (confs); i++)
    {
      const ConvConf *f = &confs[i];
      DfGraph *probe = df_graph_new (FALSE);
      DfTensor *y;
      Case c;

      conv_emb_case (&c, f);
      assert_same_bits (&c, build_conv_emb, build_conv_then_emb);
      assert_grad ("conv + channel term", &c, build_conv_emb);

      /* The residual, of the output's shape, in t[3]. */
      y = build_conv (probe, &c);
      df_tensor_free (c.t[3]);
      c.t[3] = random_4d (y->shape[0], y->shape[1], y->shape[2], y->shape[3]);
      df_graph_free (probe);
      assert_same_bits (&c, build_conv_add, build_conv_then_add);
      assert_grad ("conv + residual", &c, build_conv_add);
      case_free (&c);
    }

  /* The residual is the convolution's own input. */
  {
    Case c;

    conv_case (&c, &(ConvConf) { 2, 4, 8, 8, 4, 3, 1, 1, 1, TRUE });
    assert_same_bits (&c, build_conv_add_self, build_conv_then_add_self);
    assert_grad ("conv + its own input", &c, build_conv_add_self);
    case_free (&c);
    conv_case (&c, &(ConvConf) { 2, 16, 8, 8, 16, 3, 1, 1, 1, TRUE });
    assert_same_bits (&c, build_conv_add_self, build_conv_then_add_self);
    case_free (&c);
  }
}

static void
test_batch_invariance (void)
{
  InvCase cases[N_INV_CASES];
  int n_cases;

  inv_cases (cases, &n_cases);
  for (int i = 0; i < n_cases; i++)
    {
      InvCase *k = &cases[i];
      Case one = k->c;
      InvResult full, single;
      DfGraph *probe = df_graph_new (FALSE);
      gsize ny, per;
      float *seed;

      /* sample 1 of the batch against the batch of one made of it */
      ny = k->build (probe, &k->c)->size;
      per = ny / k->c.t[0]->shape[0];
      df_graph_free (probe);
      seed = random_seed (ny);
      full = inv_run (&k->c, k->build, k->n_batched, seed);
      for (int t = 0; t < k->n_batched; t++)
        one.t[t] = slice_sample (k->c.t[t], 1);
      single = inv_run (&one, k->build, k->n_batched, seed + per);

      g_test_message ("%s: sample 1 of %d vs batch of 1", k->name,
                      k->c.t[0]->shape[0]);
      g_assert_cmpmem (full.y + per, per * 4, single.y, per * 4);
      for (int t = 0; t < k->n_batched; t++)
        {
          gsize n1 = one.t[t]->size;

          g_assert_cmpmem (full.gx[t] + n1, n1 * 4, single.gx[t], n1 * 4);
          df_tensor_free (one.t[t]);
        }
      inv_free (&full);
      inv_free (&single);
      g_free (seed);
      case_free (&k->c);
    }
}

static void
test_thread_invariance (void)
{
  InvCase cases[N_INV_CASES];
  int n_cases, threads = omp_get_max_threads ();
  int blas_threads = df_blas_get_threads ();

  inv_cases (cases, &n_cases);
  for (int i = 0; i < n_cases; i++)
    {
      InvCase *k = &cases[i];
      InvResult r1, r2;
      DfGraph *probe = df_graph_new (FALSE);
      float *seed;

      seed = random_seed (k->build (probe, &k->c)->size);
      df_graph_free (probe);

      omp_set_num_threads (1);
      df_blas_set_threads (1);
      r1 = inv_run (&k->c, k->build, k->n_batched, seed);
      omp_set_num_threads (2);
      df_blas_set_threads (2);
      r2 = inv_run (&k->c, k->build, k->n_batched, seed);

      g_test_message ("%s: 1 thread vs 2 threads", k->name);
      g_assert_cmpmem (r1.y, r1.ny * 4, r2.y, r2.ny * 4);
      for (int t = 0; t < k->c.n_t; t++)
        g_assert_cmpmem (r1.gx[t], k->c.t[t]->size * 4, r2.gx[t],
                         k->c.t[t]->size * 4);
      inv_free (&r1);
      inv_free (&r2);
      g_free (seed);
      case_free (&k->c);
    }
  omp_set_num_threads (threads);
  df_blas_set_threads (blas_threads);
}

int
main (int argc, char **argv)
{
  int ret;

  g_test_init (&argc, &argv, NULL);
  rng = g_rand_new_with_seed (20240611);

  g_test_add_func ("/engine/ops/conv2d/forward", test_conv_forward);
  g_test_add_func ("/engine/ops/conv2d/grad", test_conv_grad);
  g_test_add_func ("/engine/ops/conv2d/grad-exact", test_conv_grad_exact);
  g_test_add_func ("/engine/ops/conv2d/fused", test_conv_fused);
  g_test_add_func ("/engine/ops/group-norm/forward", test_group_norm_forward);
  g_test_add_func ("/engine/ops/group-norm/grad", test_group_norm_grad);
  g_test_add_func ("/engine/ops/group-norm/silu-forward",
                   test_group_norm_silu_forward);
  g_test_add_func ("/engine/ops/group-norm/silu-grad",
                   test_group_norm_silu_grad);
  g_test_add_func ("/engine/ops/group-norm/silu-same",
                   test_group_norm_silu_same);
  g_test_add_func ("/engine/ops/linear/forward", test_linear_forward);
  g_test_add_func ("/engine/ops/linear/grad", test_linear_grad);
  g_test_add_func ("/engine/ops/attention/forward", test_attention_forward);
  g_test_add_func ("/engine/ops/attention/grad", test_attention_grad);
  g_test_add_func ("/engine/ops/attention/grad-shared-input",
                   test_attention_grad_shared);
  g_test_add_func ("/engine/ops/elementwise/forward",
                   test_elementwise_forward);
  g_test_add_func ("/engine/ops/elementwise/grad", test_elementwise_grad);
  g_test_add_func ("/engine/ops/shape/forward", test_shape_forward);
  g_test_add_func ("/engine/ops/shape/grad", test_shape_grad);
  g_test_add_func ("/engine/ops/loss/mse", test_loss_mse);
  g_test_add_func ("/engine/ops/loss/cross-entropy", test_loss_cross_entropy);
  g_test_add_func ("/engine/ops/loss/log-prob", test_loss_log_prob);
  g_test_add_func ("/engine/ops/chain/grad", test_chain_grad);
  g_test_add_func ("/engine/ops/fresh-grad", test_fresh_grad);
  g_test_add_func ("/engine/graph/reset-reuses-memory", test_graph_reuse);
  g_test_add_func ("/engine/graph/no-record-keeps-nothing",
                   test_graph_no_record);
  g_test_add_func ("/engine/ops/batch-invariant", test_batch_invariance);
  g_test_add_func ("/engine/ops/thread-invariant", test_thread_invariance);

  ret = g_test_run ();
  g_rand_free (rng);
  return ret;
}
