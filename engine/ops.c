/* ops.c: the UNet's heavier operations, forward and backward: convolution,
 * group norm, linear, attention, embedding, mean over H and W, upsampling,
 * channel concatenation and the image <-> token reshapes.
 *
 * Legend: N batch, Ci/Co input/output channels, H, W input size, Ho, Wo
 * output size, P = Ho*Wo, KK = Ci*kh*kw (rows of an im2col matrix), G groups,
 * S spatial size, L tokens, D features, dh = D / heads, I/O linear widths.
 *
 * Bit-identical results whatever the batch size and the thread count.
 * OpenBLAS's own threads change its results (and so does splitting a GEMM
 * differently), so OpenBLAS runs on one thread and the work is cut into
 * units whose shapes depend only on the operands' per-sample shapes: a unit
 * is one GEMM call plus its gather or scatter, and OpenMP spreads the units.
 * Every output element belongs to one unit, which sums in a fixed order.
 */
#include "tensor-private.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#include "blas.h"

/* Output positions per forward convolution unit, about: a unit is whole
 * output rows, as many as keep it near this.  GEMMs with N of 100 to 800
 * run at the same rate here, and small tiles keep the im2col tile in L2 and
 * give batch-1 passes several units per layer. */
#define CONV_TILE_P 128
/* Input channels per backward convolution unit. */
#define CONV_TILE_C 8
/* Rows per linear unit, query rows per attention unit. */
#define ROW_TILE 64

/* Keep OpenBLAS on one thread: see above. */
static void
blas_serial (void)
{
  if (df_blas_get_threads () != 1)
    {
      g_debug ("ops: OpenBLAS set to 1 thread (threads come from OpenMP, "
               "so results do not depend on the thread count)");
      df_blas_set_threads (1);
    }
}

/* ---- sums ---- */

/* Sums in double over 8 interleaved accumulators, added up in a fixed
 * order: a single double accumulator is a chain of dependent adds, 8 floats
 * a cycle slower than the vector units; the order depends on n only. */
#define SUM_LANES 8

static double
lanes_total (const double *acc)
{
  return ((acc[0] + acc[1]) + (acc[2] + acc[3]))
         + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* sum of a[i] */
DF_HOT static double
sum_f (const float *a, gsize n)
{
  double acc[SUM_LANES] = { 0 };
  gsize i = 0;

  for (; i + SUM_LANES <= n; i += SUM_LANES)
    for (int l = 0; l < SUM_LANES; l++)
      acc[l] += a[i + l];
  for (; i < n; i++)
    acc[i % SUM_LANES] += a[i];
  return lanes_total (acc);
}


/* sum of (a[i] - m)^2 */
DF_HOT static double
sum_sq_dev (const float *a, gsize n, double m)
{
  double acc[SUM_LANES] = { 0 };
  gsize i = 0;

  for (; i + SUM_LANES <= n; i += SUM_LANES)
    for (int l = 0; l < SUM_LANES; l++)
      {
        double d = a[i + l] - m;

        acc[l] += d * d;
      }
  for (; i < n; i++)
    {
      double d = a[i] - m;

      acc[i % SUM_LANES] += d * d;
    }
  return lanes_total (acc);
}

double
df_sum_f (const float *a, gsize n)
{
  return sum_f (a, n);
}

double
df_sum_sq (const float *a, gsize n)
{
  return sum_sq_dev (a, n, 0.0);
}

/* ---- conv2d ---- */

typedef struct {
  int ci, h, w, co, kh, kw, stride, pad, ho, wo;
  int hp, wp;                 /* padded input size */
} ConvGeom;

/* The range [lo, hi) of outputs whose tap (offset j) lands inside [0, n). */
static void
tap_range (int n, int out, int stride, int pad, int j, int *lo, int *hi)
{
  int off = j - pad;          /* input index = o * stride + off */

  *lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
  *hi = n - 1 - off < 0 ? 0 : (n - 1 - off) / stride + 1;
  *lo = MIN (*lo, out);
  *hi = CLAMP (*hi, *lo, out);
}

/* dst [N,C,Hp,Wp] = src [N,C,H,W] with lo zeros before and Hp - H - lo
 * (Wp - W - lo) after each column (row); with chan_major, dst is
 * [C,N,Hp,Wp] instead, so that a channel's planes for the whole batch are
 * one run of memory.  im2col and the shifted GEMMs then read without bounds
 * tests, which with rows of 7 to 28 floats cost more than the copies. */
DF_HOT static void
pad_planes (const float *src, int n, int ch, int h, int w, int hp, int wp,
            int lo, gboolean chan_major, float *dst)
{
  int pad_hi_w = wp - w - lo;
  gsize plane = (gsize) hp * wp;

#pragma omp parallel for schedule(static) if ((gsize) n * ch * plane > DF_PAR_MIN)
  for (int sc = 0; sc < n * ch; sc++)
    {
      int s = sc / ch, c = sc % ch;
      const float *sp = src + (gsize) sc * h * w;
      float *dp = dst + (chan_major ? (gsize) c * n + s : (gsize) sc) * plane;

      memset (dp, 0, (gsize) lo * wp * sizeof (float));
      for (int yy = 0; yy < h; yy++)
        {
          float *row = dp + (gsize) (yy + lo) * wp;

          memset (row, 0, lo * sizeof (float));
          memcpy (row + lo, sp + (gsize) yy * w, w * sizeof (float));
          memset (row + lo + w, 0, pad_hi_w * sizeof (float));
        }
      memset (dp + (gsize) (h + lo) * wp, 0,
              (gsize) (hp - h - lo) * wp * sizeof (float));
    }
}

/* xp [N,Ci,Hp,Wp] = x [N,Ci,H,W] padded by the convolution's pads. */
static void
pad_input (const ConvGeom *c, const float *x, int n, float *xp)
{
  pad_planes (x, n, c->ci, c->h, c->w, c->hp, c->wp, c->pad, FALSE, xp);
}

/* xp [Ci,Hp,Wp] (padded) -> col [(c1-c0)*kh*kw, (y1-y0)*Wo]: channels
 * [c0,c1) and output rows [y0,y1) of the im2col matrix. */
DF_HOT static void
im2col (const ConvGeom *c, const float *xp, int c0, int c1, int y0, int y1,
        float *col)
{
  gsize t = (gsize) (y1 - y0) * c->wo;

  for (int ch = c0; ch < c1; ch++)
    for (int i = 0; i < c->kh; i++)
      for (int j = 0; j < c->kw; j++)
        {
          float *row = col + ((gsize) ((ch - c0) * c->kh + i) * c->kw + j) * t;

          for (int oy = y0; oy < y1; oy++)
            {
              const float *src = xp + ((gsize) ch * c->hp + oy * c->stride + i)
                                      * c->wp + j;
              float *dst = row + (gsize) (oy - y0) * c->wo;

              /* Stride 1 is a contiguous copy, which vectorises. */
              if (c->stride == 1)
                for (int ox = 0; ox < c->wo; ox++)
                  dst[ox] = src[ox];
              else
                for (int ox = 0; ox < c->wo; ox++)
                  dst[ox] = src[ox * c->stride];
            }
        }
}

/* dx [Ci,H,W] channels [c0,c1) += col2im (dcol [(c1-c0)*kh*kw, P]). */
DF_HOT static void
col2im_add (const ConvGeom *c, const float *dcol, int c0, int c1, float *dx)
{
  gsize p = (gsize) c->ho * c->wo;

  for (int ch = c0; ch < c1; ch++)
    for (int i = 0; i < c->kh; i++)
      for (int j = 0; j < c->kw; j++)
        {
          const float *row = dcol
                             + ((gsize) ((ch - c0) * c->kh + i) * c->kw + j) * p;
          int ylo, yhi, xlo, xhi, off = j - c->pad;

          tap_range (c->h, c->ho, c->stride, c->pad, i, &ylo, &yhi);
          tap_range (c->w, c->wo, c->stride, c->pad, j, &xlo, &xhi);
          for (int oy = ylo; oy < yhi; oy++)
            {
              float *dst = dx + ((gsize) ch * c->h
                                 + oy * c->stride - c->pad + i) * c->w;
              const float *src = row + (gsize) oy * c->wo;

              /* Stride 1: a contiguous add the compiler vectorises. */
              if (c->stride == 1)
                {
                  float *d = dst + off;

                  for (int ox = xlo; ox < xhi; ox++)
                    d[ox] += src[ox];
                }
              else
                for (int ox = xlo; ox < xhi; ox++)
                  dst[ox * c->stride + off] += src[ox];
            }
        }
}

static void
conv_geom (ConvGeom *c, const DfTensor *x, const DfTensor *w, int stride,
           int pad_lo, int pad_hi)
{
  c->ci = x->shape[1];
  c->h = x->shape[2];
  c->w = x->shape[3];
  c->co = w->shape[0];
  c->kh = w->shape[2];
  c->kw = w->shape[3];
  c->stride = stride;
  c->pad = pad_lo;
  c->hp = c->h + pad_lo + pad_hi;
  c->wp = c->w + pad_lo + pad_hi;
  c->ho = (c->hp - c->kh) / stride + 1;
  c->wo = (c->w + pad_lo + pad_hi - c->kw) / stride + 1;
}

/* A 1x1, stride 1, unpadded convolution multiplies by x itself. */
static gboolean
conv_pointwise (const ConvGeom *c, int pad_hi)
{
  return c->kh == 1 && c->kw == 1 && c->stride == 1 && c->pad == 0
         && pad_hi == 0;
}

/* db [Co] += dy [N,Co,P] summed over N and P, in double, and de [N,Co]
 * += the per-sample sums (either may be NULL), one channel a thread: the
 * order of the sums does not depend on the thread count. */
DF_HOT static void
conv_bias_grad (const float *dy, int n, int co, gsize p, float *db,
                float *de)
{
#pragma omp parallel for schedule(static)
  for (int o = 0; o < co; o++)
    {
      double sum = 0;

      for (int s = 0; s < n; s++)
        {
          double v = sum_f (dy + ((gsize) s * co + o) * p, p);

          if (de != NULL)
            de[(gsize) s * co + o] += (float) v;
          sum += v;
        }
      if (db != NULL)
        db[o] += (float) sum;
    }
}

/* ys [Co, t] (part of one sample's output, rows p apart) += e [Co] per
 * channel. */
static void
conv_add_emb (float *ys, const float *e, int co, gsize t, gsize p)
{
  for (int o = 0; o < co; o++)
    for (gsize q = 0; q < t; q++)
      ys[o * p + q] += e[o];
}

/* The general backward: dW from im2col tiles per channel group and sample,
 * dx through W^T dY and col2im.  Used where the shifted form below is not
 * (strided and unpadded convolutions). */
DF_HOT static void
conv2d_backward_im2col (DfGraph *g, DfRecord *r)
{
  DfTensor *x = r->in[0], *w = r->in[1];
  float *dx = df_grad_or_null (x);
  float *dw = df_grad_or_null (w);               /* [Co,KK] */
  const float *dy = r->out->grad;                /* [N,Co,P] */
  int n = x->shape[0], pad_hi = r->iarg[1], n_cg, kk1;
  ConvGeom c;
  gboolean pw;
  gsize p, kk, xs, xps, per_thread;
  float *work = NULL, *xp = NULL;

  blas_serial ();
  conv_geom (&c, x, w, r->iarg[0], r->iarg[2], pad_hi);
  pw = conv_pointwise (&c, pad_hi);
  p = (gsize) c.ho * c.wo;
  kk1 = c.kh * c.kw;
  kk = (gsize) c.ci * kk1;
  xs = (gsize) c.ci * c.h * c.w;
  n_cg = (c.ci + CONV_TILE_C - 1) / CONV_TILE_C;

  /* Per thread: the im2col rows [CONV_TILE_C*kh*kw, P] of one channel group,
   * recomputed here rather than kept from the forward pass. */
  per_thread = pw ? 0 : (gsize) CONV_TILE_C * kk1 * p;
  xps = (gsize) c.ci * c.hp * c.wp;
  if (per_thread > 0)
    {
      /* [threads][per_thread] scratch, then the padded input [N,Ci,Hp,Wp]
       * (for dW only) */
      work = df_graph_workspace (g, per_thread * omp_get_max_threads ()
                                    + (dw != NULL ? n * xps : 0));
      xp = work + per_thread * omp_get_max_threads ();
      if (dw != NULL)
        pad_input (&c, x->data, n, xp);
    }

  /* dW[:, group] += sum over samples of dY col[group]^T; a unit is a
   * channel group, its samples in order. */
  if (dw != NULL)
    {
#pragma omp parallel for schedule(static)
      for (int cg = 0; cg < n_cg; cg++)
        {
          int c0 = cg * CONV_TILE_C, c1 = MIN (c0 + CONV_TILE_C, c.ci);
          float *col = work + per_thread * omp_get_thread_num ();

          for (int s = 0; s < n; s++)
            {
              const float *xn = x->data + s * xs;
              const float *b = xn + (gsize) c0 * p;

              if (!pw)
                {
                  im2col (&c, xp + s * xps, c0, c1, 0, c.ho, col);
                  b = col;
                }
              df_sgemm (DF_NO_TRANS, DF_TRANS, c.co, (c1 - c0) * kk1, p, 1.0f,
                        dy + (gsize) s * c.co * p, p, b, p, 1.0f,
                        dw + (gsize) c0 * kk1, kk);
            }
        }
    }

  /* dx[s, group] += col2im (W[:, group]^T dY[s]); a unit is (sample,
   * channel group), which owns those channels of dx. */
  if (dx != NULL)
    {
#pragma omp parallel for schedule(static)
      for (int u = 0; u < n * n_cg; u++)
        {
          int s = u / n_cg, c0 = (u % n_cg) * CONV_TILE_C;
          int c1 = MIN (c0 + CONV_TILE_C, c.ci);
          const float *dys = dy + (gsize) s * c.co * p;
          float *dxs = dx + s * xs;

          if (pw)
            df_sgemm (DF_TRANS, DF_NO_TRANS, c1 - c0, p, c.co, 1.0f,
                      w->data + c0, kk, dys, p, 1.0f, dxs + (gsize) c0 * p, p);
          else
            {
              float *dcol = work + per_thread * omp_get_thread_num ();

              df_sgemm (DF_TRANS, DF_NO_TRANS, (c1 - c0) * kk1, p, c.co, 1.0f,
                        w->data + (gsize) c0 * kk1, kk, dys, p, 0.0f, dcol, p);
              col2im_add (&c, dcol, c0, c1, dxs);
            }
        }
    }
}

/* The shifted form of a stride-1 convolution: no im2col.  On the padded
 * input, tap (i, j) of output position (oy, ox) reads xp[c, oy + i, ox + j],
 * so with outputs indexed in the padded width (q = oy Wp + ox) the tap's
 * operand is xp itself shifted by i Wp + j: a [Ci, rows Wp] matrix of row
 * stride Hp Wp, which OpenBLAS packs directly.  A tile is then kh kw GEMMs
 * of K = Ci summed in tap order, plus Wp - Wo wasted columns per row; used
 * where that waste is small (wide images), im2col elsewhere. */
static gboolean
conv_shifted (const ConvGeom *c)
{
  return c->stride == 1 && c->wo >= 14;
}

/* wt [kh*kw][Co,Ci] = w [Co,Ci,kh,kw] */
static void
conv_weights_by_tap (const ConvGeom *c, const float *w, float *wt)
{
  int taps = c->kh * c->kw;

  for (int o = 0; o < c->co; o++)
    for (int ch = 0; ch < c->ci; ch++)
      for (int k = 0; k < taps; k++)
        wt[((gsize) k * c->co + o) * c->ci + ch] =
          w[((gsize) o * c->ci + ch) * taps + k];
}

/* acc [Co, (y1-y0-1) Wp + Wo] = sum over taps of wt[tap] xp shifted, for
 * output rows [y0,y1) in padded-width positions; xp's channels are plane
 * floats apart.  The last row stops at Wo
 * so no tap reads past the sample's padded input. */
static void
conv_tile_shifted (const ConvGeom *c, const float *xp, gsize plane,
                   const float *wt, int y0, int y1, float *acc)
{
  int nq = (y1 - y0 - 1) * c->wp + c->wo;

  for (int i = 0; i < c->kh; i++)
    for (int j = 0; j < c->kw; j++)
      {
        int k = i * c->kw + j;

        df_sgemm (DF_NO_TRANS, DF_NO_TRANS, c->co, nq, c->ci, 1.0f,
                  wt + (gsize) k * c->co * c->ci, c->ci,
                  xp + (gsize) (y0 + i) * c->wp + j, plane,
                  k == 0 ? 0.0f : 1.0f, acc, nq);
      }
}

/* ys[:, rows y0..y1) [Co, *] (row stride p) = acc without the padding
 * columns, + b. */
DF_HOT static void
conv_tile_store (const ConvGeom *c, const float *acc, int y0, int y1,
                 const DfTensor *b, float *ys, gsize p)
{
  int nq = (y1 - y0 - 1) * c->wp + c->wo;

  for (int o = 0; o < c->co; o++)
    {
      float bias = b != NULL ? b->data[o] : 0.0f;

      for (int r = 0; r < y1 - y0; r++)
        {
          const float *src = acc + (gsize) o * nq + (gsize) r * c->wp;
          float *dst = ys + (gsize) o * p + (gsize) r * c->wo;

          if (b != NULL)
            for (int ox = 0; ox < c->wo; ox++)
              dst[ox] = src[ox] + bias;
          else
            memcpy (dst, src, c->wo * sizeof (float));
        }
    }
}

/* ---- Winograd F(2x2, 3x3) ----
 *
 * Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016):
 * a 2x2 block of a 3x3 convolution's outputs from the 4x4 input patch under
 * it is Y = A^T [(G g G^T) (.) (B^T d B)] A, so per tile the multiplies are
 * 16 elementwise products instead of 36, and summed over input channels
 * those products are 16 GEMMs [Co,Ci] x [Ci,tiles]: 2.25 times fewer
 * multiply-adds than the direct form.  The transforms' coefficients are 0,
 * +-1 and +-1/2, so in float it is as accurate as the direct sum to a few
 * units in the last place.
 *
 *   B^T = | 1  0 -1  0 |   G = | 1    0    0   |   A^T = | 1  1  1  0 |
 *         | 0  1  1  0 |       | 1/2  1/2  1/2 |         | 0  1 -1 -1 |
 *         | 0 -1  1  0 |       | 1/2 -1/2  1/2 |
 *         | 0  1  0 -1 |       | 0    0    1   |
 *
 * Used for the "same" 3x3 convolutions (stride 1, pad 1) with rows of 7
 * or more: forward, input gradient (the transposed convolution is a
 * "same" 3x3 one by the flipped, transposed kernel) and weight gradient
 * (wino_weight_grad).  An odd size has a last row or column of tiles half
 * outside the image: its input patch reads one more zero of padding, its
 * outputs outside are dropped (forward) or taken as zero (dY, for dW).  A
 * unit is (sample, band of tile rows), a run of samples for dW, so results
 * depend on neither the batch nor the thread count.  Rows under 7 keep
 * the direct forms below. */

/* Tiles per unit, about: the GEMMs' N.  Up to 32 x 32 images a unit is a
 * whole sample (196 tiles at 28 x 28): at the UNet's 32 to 64 channels a
 * GEMM of N 196 runs 10-20% faster than three of N 70, and the batches the
 * samplers run (two samples or more under free guidance) still give every
 * thread a unit. */
#define WINO_TILES 256

/* Samples per unit of the Winograd dW (wino_weight_grad): a unit is a
 * thread's, its GEMMs per (sample, band), or per group of samples when a
 * sample has few tiles.  Groups divide it. */
#define WINO_DW_SAMPLES 8

typedef struct {
  int    ci, co;              /* channels in and out */
  int    h, w;                /* output size = input size */
  int    th, tw;              /* tile rows and columns: h / 2, w / 2 rounded up */
  int    band, n_bands;       /* tile rows per unit, units per sample */
  int    dw_group;            /* samples side by side in a dW GEMM */
  gsize  x_sample, x_chan;    /* input strides */
  gsize  y_sample, y_chan;    /* output strides (dY's, for dW) */
} Wino;

static gboolean
conv_winograd (const ConvGeom *c, int pad_hi)
{
  return c->kh == 3 && c->kw == 3 && c->stride == 1 && c->pad == 1
         && pad_hi == 1 && c->w >= 7;
}

/* A "same" 3x3 convolution ci -> co of an input [N,Ci,H,W] into an output
 * [N,Co,H,W].  Its patches read the input as if padded by one zero before
 * and one or two after (2 th + 2 rows of 2 tw + 2), a row at a time. */
static void
wino_init (Wino *wi, int ci, int co, int h, int w)
{
  int tiles;

  wi->ci = ci;
  wi->co = co;
  wi->h = h;
  wi->w = w;
  wi->th = (h + 1) / 2;
  wi->tw = (w + 1) / 2;
  tiles = wi->th * wi->tw;
  wi->n_bands = MAX (1, (tiles + WINO_TILES - 1) / WINO_TILES);
  wi->band = (wi->th + wi->n_bands - 1) / wi->n_bands;
  wi->n_bands = (wi->th + wi->band - 1) / wi->band;
  /* A sample with few tiles shares its dW GEMMs with others of its run,
   * as many as divide the run and keep K near WINO_TILES. */
  wi->dw_group = 1;
  if (wi->n_bands == 1)
    while (wi->dw_group < WINO_DW_SAMPLES
           && 2 * wi->dw_group * tiles <= WINO_TILES)
      wi->dw_group *= 2;
  wi->x_sample = (gsize) ci * h * w;
  wi->x_chan = (gsize) h * w;
  wi->y_sample = (gsize) co * h * w;
  wi->y_chan = (gsize) h * w;
}

/* Floats of wino_input's column transforms: 8 runs of (band + 1) tw, the
 * even and odd padded rows of a band by 4 column combinations
 * (wino_output and wino_dy use 4 runs of a band's tiles, fewer). */
static gsize
wino_rows (const Wino *wi)
{
  return (gsize) 8 * (wi->band + 1) * wi->tw;
}

/* Floats of a thread's scratch for units of T tiles: V [16][Ci,T] and M
 * [16][Co,T] (E instead of M for dW), at least the [9][Ci] taps of
 * wino_weights, then wino_input's rows.  All of it lives in the graph's
 * workspace: nothing sized by the input goes on a thread's stack. */
static gsize
wino_scratch (const Wino *wi, gsize T)
{
  return MAX (16 * T * (wi->ci + wi->co), (gsize) 9 * wi->ci)
         + wino_rows (wi);
}

/* The same for the forward's units, a band each. */
static gsize
wino_per_thread (const Wino *wi)
{
  return wino_scratch (wi, (gsize) wi->band * wi->tw);
}

/* u [Co][16][Ci] = G g G^T of each kernel g, so that transform k is the
 * matrix [Co,Ci] at u + k Ci with rows 16 Ci apart.  w is the forward's
 * [Co,Ci,3,3]; with flip, wi is the transposed convolution (its ci and co
 * the forward's co and ci), whose kernel (o, c) is the forward's (c, o)
 * rotated by 180 degrees.  Per output channel the taps go to planes
 * [9][Ci] in the thread's scratch first, so that the transform runs over
 * contiguous kernels. */
DF_HOT static void
wino_weights (const Wino *wi, const float *w, gboolean flip, float *u,
              float *work)
{
  int ci = wi->ci, co = wi->co;
  gsize per_thread = wino_per_thread (wi);

#pragma omp parallel for schedule(static) if ((gsize) co * ci * 16 > DF_PAR_MIN)
  for (int o = 0; o < co; o++)
    {
      float *restrict g = work + per_thread * omp_get_thread_num ();
      float *restrict uo = u + (gsize) o * 16 * ci;

      for (int c = 0; c < ci; c++)
        {
          const float *k = flip ? w + ((gsize) c * co + o) * 9
                                : w + ((gsize) o * ci + c) * 9;

          for (int j = 0; j < 9; j++)
            g[(gsize) j * ci + c] = k[flip ? 8 - j : j];
        }
      for (int r = 0; r < 4; r++)
        {
          float *restrict u0 = uo + (gsize) (4 * r) * ci;
          float *restrict u1 = u0 + ci, *restrict u2 = u1 + ci;
          float *restrict u3 = u2 + ci;

          /* Row r of G g (rows of g: taps 0-2, 3-5, 6-8), then times G^T. */
          for (int c = 0; c < ci; c++)
            {
              float t[3];

              for (int col = 0; col < 3; col++)
                {
                  float a = g[(gsize) col * ci + c];
                  float b = g[(gsize) (3 + col) * ci + c];
                  float d = g[(gsize) (6 + col) * ci + c];

                  t[col] = r == 0 ? a : r == 3 ? d
                           : r == 1 ? 0.5f * (a + b + d) : 0.5f * (a - b + d);
                }
              u0[c] = t[0];
              u1[c] = 0.5f * (t[0] + t[1] + t[2]);
              u2[c] = 0.5f * (t[0] - t[1] + t[2]);
              u3[c] = t[2];
            }
        }
    }
}

/* V[k][c, t0 + t] = (B^T d B)[k] for channels [c0, c1) and the tiles t of
 * tile rows [a0, a1), d the 4x4 patch at tile t of the input xs (one
 * sample) padded; V's rows are T floats long.  Columns first: each padded
 * row's 4 column combinations of every tile, into ct [2][4][band + 1][tw]
 * by even and odd rows; a patch's rows are then rows a and a + 1 of the
 * even and odd ones, so each of the 16 results is a difference of two runs
 * of ct, tw floats apart, over all the band's tiles at once (runs that
 * vectorise even at 4 tiles a row).  ct: wino_rows floats. */
DF_HOT static void
wino_input (const Wino *wi, const float *restrict xs, int c0, int c1, int a0,
            int a1, gsize T, gsize t0, float *restrict v,
            float *restrict ct)
{
  int tw = wi->tw, w = wi->w, nb = a1 - a0;
  gsize tb = (gsize) nb * tw, run = (gsize) (nb + 1) * tw;
  gsize kc = (gsize) wi->ci * T;

  for (int c = c0; c < c1; c++)
    {
      const float *x0 = xs + c * wi->x_chan;
      float *restrict vc = v + (gsize) c * T + t0;

      /* Column combinations (p - u, q + u, u - q, q - z) of each patch
       * row (p, q, u, z) of the padded rows 2 a0 .. 2 a1 + 1, input rows
       * y = 2 a0 - 1 .. 2 a1: a tile b's row is input columns 2b - 1 ..
       * 2b + 2, inside the row but for the first tile's p and the last
       * one's z (and u, for odd w), which are padding. */
      for (int r = 0; r < 2 * (nb + 1); r++)
        {
          int y = 2 * a0 + r - 1, last = tw - 1;
          const float *restrict xr = x0 + (gsize) y * w;
          float *restrict e0 = ct + (gsize) (r % 2) * 4 * run
                               + (gsize) (r / 2) * tw;
          float *restrict e1 = e0 + run, *restrict e2 = e1 + run;
          float *restrict e3 = e2 + run;
          float p, q, u;

          if (y < 0 || y >= wi->h)
            {
              for (int b = 0; b < tw; b++)
                e0[b] = e1[b] = e2[b] = e3[b] = 0.0f;
              continue;
            }
          e0[0] = -xr[1];
          e1[0] = xr[0] + xr[1];
          e2[0] = xr[1] - xr[0];
          e3[0] = xr[0] - xr[2];
          for (int b = 1; b < last; b++)
            {
              p = xr[2 * b - 1];
              q = xr[2 * b];
              u = xr[2 * b + 1];
              e0[b] = p - u;
              e1[b] = q + u;
              e2[b] = u - q;
              e3[b] = q - xr[2 * b + 2];
            }
          p = xr[2 * last - 1];
          q = xr[2 * last];
          u = 2 * last + 1 < w ? xr[2 * last + 1] : 0.0f;
          e0[last] = p - u;
          e1[last] = q + u;
          e2[last] = u - q;
          e3[last] = q;
        }

      /* Row combinations (r0 - r2, r1 + r2, r2 - r1, r1 - r3). */
      for (int j = 0; j < 4; j++)
        {
          const float *restrict ev = ct + (gsize) j * run;
          const float *restrict od = ev + 4 * run;
          float *restrict v0 = vc + (gsize) j * kc;
          float *restrict v1 = v0 + 4 * kc, *restrict v2 = v1 + 4 * kc;
          float *restrict v3 = v2 + 4 * kc;

          for (gsize l = 0; l < tb; l++)
            {
              v0[l] = ev[l] - ev[l + tw];
              v1[l] = od[l] + ev[l + tw];
              v2[l] = ev[l + tw] - od[l];
              v3[l] = od[l] - od[l + tw];
            }
        }
    }
}

/* y[0, w) (+)= the even and odd outputs of a row's tiles interleaved (the
 * last odd one dropped when w is odd); with res, y = res + them instead. */
static inline void
wino_put_row (float *restrict y, const float *restrict res,
              const float *restrict even, const float *restrict odd, int w,
              gboolean add)
{
  int pairs = w / 2;

  if (res != NULL)
    {
      for (int b = 0; b < pairs; b++)
        {
          y[2 * b] = res[2 * b] + even[b];
          y[2 * b + 1] = res[2 * b + 1] + odd[b];
        }
      if (w % 2 != 0)
        y[w - 1] = res[w - 1] + even[pairs];
      return;
    }
  if (add)
    for (int b = 0; b < pairs; b++)
      {
        y[2 * b] += even[b];
        y[2 * b + 1] += odd[b];
      }
  else
    for (int b = 0; b < pairs; b++)
      {
        y[2 * b] = even[b];
        y[2 * b + 1] = odd[b];
      }
  if (w % 2 != 0 && add)
    y[w - 1] += even[pairs];
  else if (w % 2 != 0)
    y[w - 1] = even[pairs];
}

/* What a convolution's output gets besides the convolution: bias [Co],
 * emb [N,Co] per channel after it, res (the output's shape) added last
 * (y = res + them), each NULL when none; or with add, y += the convolution
 * alone. */
typedef struct {
  const float *bias, *emb, *res;
  gboolean     add;
} WinoOut;

/* ys[o, rows 2a..2a+1] (+)= A^T M[., o, t0 + tiles of row a] A, + what out
 * asks for sample s, for output channels [o0,
 * o1) and tile rows [a0, a1) of one sample,
 * without the outputs outside the image; M's rows are T floats long.  Per
 * channel the four outputs of every tile are computed over the band's tb
 * tiles at once (runs of tb floats, which vectorise), into q [4][tb], then
 * interleaved into the rows.  q: wino_rows floats. */
DF_HOT static void
wino_output (const Wino *wi, const float *restrict m, gsize T, gsize t0,
             int o0, int o1, int a0, int a1, const WinoOut *out, int s,
             float *restrict y, float *restrict q)
{
  int tw = wi->tw, tb = (a1 - a0) * tw;
  gsize ct = (gsize) wi->co * T;
  const float *bias = out->bias;
  const float *emb = out->emb != NULL ? out->emb + (gsize) s * wi->co : NULL;
  const float *res = out->res != NULL ? out->res + s * wi->y_sample : NULL;
  float *restrict ys = y + s * wi->y_sample;
  float *restrict q00 = q, *restrict q01 = q + tb;
  float *restrict q10 = q + 2 * tb, *restrict q11 = q + 3 * tb;

  for (int o = o0; o < o1; o++)
    {
      const float *restrict mo = m + (gsize) o * T + t0;
      float bo = bias != NULL ? bias[o] : 0.0f;

      for (int t = 0; t < tb; t++)
        {
          float r0[4], r1[4];

          for (int j = 0; j < 4; j++)
            {
              float m0 = mo[(gsize) j * ct + t];
              float m1 = mo[(gsize) (4 + j) * ct + t];
              float m2 = mo[(gsize) (8 + j) * ct + t];
              float m3 = mo[(gsize) (12 + j) * ct + t];

              r0[j] = m0 + m1 + m2;
              r1[j] = m1 - m2 - m3;
            }
          q00[t] = r0[0] + r0[1] + r0[2] + bo;
          q01[t] = r0[1] - r0[2] - r0[3] + bo;
          q10[t] = r1[0] + r1[1] + r1[2] + bo;
          q11[t] = r1[1] - r1[2] - r1[3] + bo;
        }
      if (emb != NULL)
        for (int t = 0; t < tb; t++)
          {
            q00[t] += emb[o];
            q01[t] += emb[o];
            q10[t] += emb[o];
            q11[t] += emb[o];
          }
      for (int a = a0; a < a1; a++)
        {
          int ta = (a - a0) * tw;
          float *y0 = ys + o * wi->y_chan + (gsize) 2 * a * wi->w;

          const float *r0 = res != NULL ? y0 - ys + res : NULL;

          wino_put_row (y0, r0, q00 + ta, q01 + ta, wi->w, out->add);
          if (2 * a + 1 < wi->h)
            wino_put_row (y0 + wi->w, r0 != NULL ? r0 + wi->w : NULL,
                          q10 + ta, q11 + ta, wi->w, out->add);
        }
    }
}

/* M[k] [Co,T] = U[k] [Co,Ci] V[k] [Ci,T] for transforms [k0, k1). */
static void
wino_gemms (const Wino *wi, const float *u, const float *v, int T, int k0,
            int k1, float *m)
{
  for (int k = k0; k < k1; k++)
    df_sgemm (DF_NO_TRANS, DF_NO_TRANS, wi->co, T, wi->ci, 1.0f,
              u + (gsize) k * wi->ci, 16 * wi->ci,
              v + (gsize) k * wi->ci * T, T, 0.0f,
              m + (gsize) k * wi->co * T, T);
}

/* y (+)= the convolution of the input x by the kernel whose
 * transform is u, for n samples; work: threads x wino_per_thread floats.
 * A unit is (sample, band); with fewer units than threads (one sample at
 * the UNet's sizes) each unit's input transform, GEMMs and output
 * transform are spread over the threads in turn instead, on the first
 * thread's V and M: the same arithmetic in the same order either way, so
 * the same bits. */
DF_HOT static void
wino_run (const Wino *wi, const float *x, int n, const float *u,
          const WinoOut *out, float *y, float *work)
{
  gsize per_thread = wino_per_thread (wi);
  gsize rows_at = per_thread - wino_rows (wi);
  int units = n * wi->n_bands;

  if (units >= omp_get_max_threads ())
    {
#pragma omp parallel for schedule(static)
      for (int un = 0; un < units; un++)
        {
          int s = un / wi->n_bands, a0 = (un % wi->n_bands) * wi->band;
          int a1 = MIN (a0 + wi->band, wi->th), T = (a1 - a0) * wi->tw;
          float *v = work + per_thread * omp_get_thread_num ();
          float *m = v + (gsize) 16 * wi->ci * T;

          wino_input (wi, x + s * wi->x_sample, 0, wi->ci, a0, a1, T, 0, v,
                      v + rows_at);
          wino_gemms (wi, u, v, T, 0, 16, m);
          wino_output (wi, m, T, 0, 0, wi->co, a0, a1, out, s, y,
                       v + rows_at);
        }
      return;
    }

  for (int un = 0; un < units; un++)
    {
      int s = un / wi->n_bands, a0 = (un % wi->n_bands) * wi->band;
      int a1 = MIN (a0 + wi->band, wi->th), T = (a1 - a0) * wi->tw;
      float *v = work, *m = v + (gsize) 16 * wi->ci * T;

#pragma omp parallel for schedule(static)
      for (int c = 0; c < wi->ci; c++)
        wino_input (wi, x + s * wi->x_sample, c, c + 1, a0, a1, T, 0, v,
                    work + per_thread * omp_get_thread_num () + rows_at);
#pragma omp parallel for schedule(static)
      for (int k = 0; k < 16; k++)
        wino_gemms (wi, u, v, T, k, k + 1, m);
#pragma omp parallel for schedule(static)
      for (int o = 0; o < wi->co; o++)
        wino_output (wi, m, T, 0, o, o + 1, a0, a1, out, s, y,
                     work + per_thread * omp_get_thread_num () + rows_at);
    }
}

/* Samples per dW unit of the shifted backward.  A unit is one GEMM over
 * every output and input channel (splitting Co or Ci would pack the other
 * operand again per block, which costs as much as the multiply at these
 * sizes); the batch is cut into fixed runs of samples instead, and their
 * partial sums are added in order, so the result does not depend on the
 * thread count. */
#define CONV_DW_SAMPLES 16

/* Floats of a thread's scratch in wino_weight_grad: a group's tiles. */
static gsize
wino_dw_per_thread (const Wino *wi)
{
  return wino_scratch (wi, (gsize) wi->dw_group * wi->band * wi->tw);
}

/* Floats of wino_weight_grad's scratch for n samples and threads. */
static gsize
wino_dw_scratch (const Wino *wi, int n, int threads)
{
  int n_runs = (n + WINO_DW_SAMPLES - 1) / WINO_DW_SAMPLES;

  return (gsize) threads * wino_dw_per_thread (wi)
         + (gsize) n_runs * 16 * wi->co * wi->ci;
}

/* even[b] = x[2b], odd[b] = x[2b + 1] for the (w + 1) / 2 column pairs of
 * a row x of w floats, 0 for the odd one past the end. */
static inline void
wino_split_row (const float *restrict x, int w, float *restrict even,
                float *restrict odd)
{
  int pairs = w / 2;

  for (int b = 0; b < pairs; b++)
    {
      even[b] = x[2 * b];
      odd[b] = x[2 * b + 1];
    }
  if (w % 2 != 0)
    {
      even[pairs] = x[w - 1];
      odd[pairs] = 0.0f;
    }
}

/* E[k][o, t0 + t] = (A dY A^T)[k] for the tiles t of tile rows [a0, a1) of
 * one sample's dY (output gradient, at wi's y strides); E's rows are T
 * floats long.  A 2x2 tile [[p, q], [r, z]] (zeros outside the image) goes
 * to rows (p, q), (p + r, q + z), (p - r, q - z), (-r, -z), and each row
 * (x, y) to (x, x + y, x - y, -y).  Per channel the band's p, q, r and z
 * go to runs of its tiles first, in pq (wino_rows floats), so that the 16
 * results are computed over all of them at once. */
DF_HOT static void
wino_dy (const Wino *wi, const float *restrict dys, int a0, int a1, gsize T,
         gsize t0, float *restrict e, float *restrict pq)
{
  int tw = wi->tw, w = wi->w;
  gsize tb = (gsize) (a1 - a0) * tw, kt = (gsize) wi->co * T;
  float *restrict P = pq, *restrict Q = P + tb;
  float *restrict R = Q + tb, *restrict Z = R + tb;

  for (int o = 0; o < wi->co; o++)
    {
      float *restrict eo = e + (gsize) o * T + t0;

      for (int a = a0; a < a1; a++)
        {
          const float *d0 = dys + o * wi->y_chan + (gsize) 2 * a * w;
          const float *d1 = d0 + w;
          gsize l = (gsize) (a - a0) * tw;

          wino_split_row (d0, w, P + l, Q + l);
          if (2 * a + 1 < wi->h)
            wino_split_row (d1, w, R + l, Z + l);
          else
            for (int b = 0; b < tw; b++)
              R[l + b] = Z[l + b] = 0.0f;
        }

      /* The 16 runs are kt floats apart, so never overlap. */
#ifndef __clang__
#pragma GCC ivdep
#endif
      for (gsize l = 0; l < tb; l++)
        {
          float p = P[l], q = Q[l], r = R[l], z = Z[l];
          float sp = p + r, sq = q + z, dp = p - r, dq = q - z;

          eo[l] = p;
          eo[kt + l] = p + q;
          eo[2 * kt + l] = p - q;
          eo[3 * kt + l] = -q;
          eo[4 * kt + l] = sp;
          eo[5 * kt + l] = sp + sq;
          eo[6 * kt + l] = sp - sq;
          eo[7 * kt + l] = -sq;
          eo[8 * kt + l] = dp;
          eo[9 * kt + l] = dp + dq;
          eo[10 * kt + l] = dp - dq;
          eo[11 * kt + l] = -dq;
          eo[12 * kt + l] = -r;
          eo[13 * kt + l] = -r - z;
          eo[14 * kt + l] = z - r;
          eo[15 * kt + l] = z;
        }
    }
}

/* dU[k][o, c] = sum over tiles t of (A dY_o A^T)[k] at t times V[k][c, t]:
 * the gradient of the forward's U = G g G^T, 16 GEMMs a (group of
 * samples, band) of K = their tiles; then dg = G^T dU G.  x is the
 * input and dy [N,Co,H,W] the output gradient, at wi's strides (Ci
 * in, Co out).  A unit is a run of WINO_DW_SAMPLES samples, done band by
 * band so that a band's V and E stay in cache, or wi->dw_group samples at
 * a time side by side when a sample is one band of few tiles; the runs'
 * partial dU are summed in order, so dW does not depend on the thread
 * count.  work: wino_dw_scratch floats for threads threads. */
DF_HOT static void
wino_weight_grad (const Wino *wi, const float *x, const float *dy, int n,
                  float *dw, float *work, int threads)
{
  int ci = wi->ci, co = wi->co, tw = wi->tw;
  int n_runs = (n + WINO_DW_SAMPLES - 1) / WINO_DW_SAMPLES;
  gsize cc16 = (gsize) 16 * co * ci, per_thread = wino_dw_per_thread (wi);
  gsize rows_at = per_thread - wino_rows (wi);
  float *du = work + per_thread * threads;

#pragma omp parallel for schedule(static)
  for (int run = 0; run < n_runs; run++)
    {
      int s0 = run * WINO_DW_SAMPLES, s1 = MIN (s0 + WINO_DW_SAMPLES, n);
      float *v = work + per_thread * omp_get_thread_num ();
      float *dur = du + run * cc16;

      for (int sg = s0; sg < s1; sg += wi->dw_group)
        for (int a0 = 0; a0 < wi->th; a0 += wi->band)
          {
            int a1 = MIN (a0 + wi->band, wi->th);
            int sg1 = MIN (sg + wi->dw_group, s1);
            gsize tb = (gsize) (a1 - a0) * tw, T = tb * (sg1 - sg);
            gsize kt = (gsize) co * T;
            float *e = v + (gsize) 16 * ci * T;

            for (int s = sg; s < sg1; s++)
              {
                wino_input (wi, x + s * wi->x_sample, 0, ci, a0, a1, T,
                            (s - sg) * tb, v, v + rows_at);
                wino_dy (wi, dy + s * wi->y_sample, a0, a1, T, (s - sg) * tb,
                         e, v + rows_at);
              }

            /* dU[run][o][k][c] (+)= E[k] V[k]^T */
            for (int k = 0; k < 16; k++)
              df_sgemm (DF_NO_TRANS, DF_TRANS, co, ci, (int) T, 1.0f,
                        e + (gsize) k * kt, T, v + (gsize) k * ci * T, T,
                        sg == s0 && a0 == 0 ? 0.0f : 1.0f,
                        dur + (gsize) k * ci, 16 * ci);
          }
    }

  /* dw [Co,Ci,3,3] += G^T (sum of the runs' dU in order) G; G^T's rows are
   * (1, 1/2, 1/2, 0), (0, 1/2, -1/2, 0), (0, 1/2, 1/2, 1).  Per output
   * channel the runs' rows dU[run][o][k] are summed first, into m [16][Ci]
   * in the thread's scratch. */
#pragma omp parallel for schedule(static) if (cc16 > DF_PAR_MIN)
  for (int o = 0; o < co; o++)
    {
      float *restrict m = work + per_thread * omp_get_thread_num ();

      for (int k = 0; k < 16; k++)
        {
          float *restrict mk = m + (gsize) k * ci;

          memcpy (mk, du + ((gsize) o * 16 + k) * ci, ci * sizeof (float));
          for (int run = 1; run < n_runs; run++)
            {
              const float *restrict dr = du + run * cc16
                                         + ((gsize) o * 16 + k) * ci;

              for (int c = 0; c < ci; c++)
                mk[c] += dr[c];
            }
        }
      for (int c = 0; c < ci; c++)
        {
          float gm[3][4], *d = dw + ((gsize) o * ci + c) * 9;

          /* G^T m: rows of m are (m0, m1, m2, m3) per column j */
          for (int j = 0; j < 4; j++)
            {
              float m0 = m[(gsize) j * ci + c], m1 = m[(gsize) (4 + j) * ci + c];
              float m2 = m[(gsize) (8 + j) * ci + c];
              float m3 = m[(gsize) (12 + j) * ci + c];

              gm[0][j] = m0 + 0.5f * (m1 + m2);
              gm[1][j] = 0.5f * (m1 - m2);
              gm[2][j] = 0.5f * (m1 + m2) + m3;
            }
          /* (G^T m) G */
          for (int i = 0; i < 3; i++)
            {
              float g0 = gm[i][0], g1 = gm[i][1], g2 = gm[i][2];
              float g3 = gm[i][3];

              d[i * 3] += g0 + 0.5f * (g1 + g2);
              d[i * 3 + 1] += 0.5f * (g1 - g2);
              d[i * 3 + 2] += 0.5f * (g1 + g2) + g3;
            }
        }
    }
}

/* ---- Winograd F(4x4, 3x3) down the channels ----
 *
 * The "same" 3x3 convolutions of rows of 7 or more whose channels in and
 * out come in blocks of 16 (all the UNet's but its first and last) take
 * Lavin and Gray's F(4x4, 3x3) instead of the F(2x2, 3x3) above: 6x6
 * patches to 4x4 output tiles, 36 products for 16 outputs, 2.25
 * multiplies an output against F(2x2)'s 4 (and the direct form's 9).
 *
 *   B^T = | 4  0 -5  0  1  0 |   G = |  1/4    0     0   |
 *         | 0 -4 -4  1  1  0 |       | -1/6  -1/6  -1/6  |
 *         | 0  4 -4 -1  1  0 |       | -1/6   1/6  -1/6  |
 *         | 0 -2 -1  2  1  0 |       |  1/24  1/12  1/6  |
 *         | 0  2 -1 -2  1  0 |       |  1/24 -1/12  1/6  |
 *         | 0  4  0 -5  0  1 |       |  0     0     1    |
 *
 *   A^T = | 1  1  1  1  1  0 |
 *         | 0  1 -1  2 -2  0 |
 *         | 0  1  1  4  4  0 |
 *         | 0  1 -1  8 -8  1 |
 *
 * Its transforms run across the channels, 16 at a time: a sample is first
 * laid out by pixel, [H][W][C] (8 x 8 transposes in registers), so that
 * a tile's patch is 36 vectors of 16 channels and a transform is vector
 * arithmetic alone, whatever the image's width.  V [36][T][Ci] (tile
 * rows, channels) keeps that order, M[k] [T,Co] = V[k] U[k] with U
 * [36][Ci][Co], and the outputs go back to [C][H][W] through the same
 * transposes.  Transform k is 6 i + j: i down the patch, j across.
 *
 * A unit is a group of samples, W4_ROWS tiles or more on small images,
 * whose GEMMs take one U[k] for all of them in turn (w4_gemms); with fewer
 * units than threads, the threads share each unit by channel blocks and
 * transforms instead, in the same order, so the same bits.  dW runs as
 * the F(2x2) one does, in fixed runs of WINO_DW_SAMPLES samples summed in
 * order.  The coefficients reach 8, so results are further from the
 * direct sum than F(2x2)'s: about 3e-6 of a layer's largest output at the
 * UNet's sizes (up to 1e-5 at 512 channels) against 2e-7. */

#define W4_VL 16
/* Tiles of a forward unit, at least: a 7 x 7 image has 4, and a unit's
 * GEMMs by one U[k] in turn keep it in cache (36 of them are 2.4 MB at
 * 128 channels). */
#define W4_ROWS 32
/* The same for dW, whose GEMMs sum over the tiles (K). */
#define W4_DW_ROWS 64

/* 16 floats; W4_AT (p) is the 16 floats at p, any alignment. */
typedef float W4Vec __attribute__ ((vector_size (W4_VL * sizeof (float))));
typedef float W4Mem __attribute__ ((vector_size (W4_VL * sizeof (float)),
                                    aligned (sizeof (float)), may_alias));
#define W4_AT(p) (*(W4Mem *) (p))

#if defined(__clang__)
#define W4_UNROLL _Pragma ("unroll")
#elif defined(__GNUC__)
#define W4_UNROLL _Pragma ("GCC unroll 16")
#else
#define W4_UNROLL
#endif

typedef struct {
  int    ci, co;              /* channels in and out */
  int    h, w;                /* output size = input size */
  int    th, tw, tiles;       /* tile rows, columns: h / 4, w / 4 up */
  int    group;               /* samples a unit */
  int    T;                   /* tile rows of a unit: group x tiles */
  int    hp, wp;              /* the laid-out input: 4 th + 2, 4 tw + 2 */
  gsize  kv, km;              /* floats from V[k] (M[k]) to V[k + 1] */
  gsize  ku;                  /* the same for U[k] (and dW's dU[k]) */
  gsize  x_sample, y_sample;  /* input and output sample strides */
} Wino4;

static gboolean
conv_winograd4 (const ConvGeom *c, int pad_hi)
{
  return conv_winograd (c, pad_hi) && c->ci % W4_VL == 0
         && c->co % W4_VL == 0;
}

/* rows floats apart, rounded up to an odd multiple of 16: 36 runs a
 * multiple of 4 KiB apart would share the L1's sets. */
static gsize
w4_stride (gsize rows)
{
  return (rows / W4_VL) % 2 == 0 ? rows + W4_VL : rows;
}

/* A "same" 3x3 convolution ci -> co on h x w, in units of at least rows
 * tile rows (or one sample), of max_group samples at most. */
static void
w4_init (Wino4 *wi, int ci, int co, int h, int w, int rows, int max_group)
{
  wi->ci = ci;
  wi->co = co;
  wi->h = h;
  wi->w = w;
  wi->th = (h + 3) / 4;
  wi->tw = (w + 3) / 4;
  wi->tiles = wi->th * wi->tw;
  wi->group = CLAMP (rows / wi->tiles, 1, max_group);
  wi->T = wi->group * wi->tiles;
  wi->hp = 4 * wi->th + 2;
  wi->wp = 4 * wi->tw + 2;
  wi->kv = w4_stride ((gsize) wi->T * ci);
  wi->km = w4_stride ((gsize) wi->T * co);
  wi->ku = w4_stride ((gsize) ci * co);
  wi->x_sample = (gsize) ci * h * w;
  wi->y_sample = (gsize) co * h * w;
}

/* Floats of U (or a dU). */
static gsize
w4_u_floats (const Wino4 *wi)
{
  return 36 * wi->ku;
}

/* Floats of a laid-out sample: the padded input, or the output tiles
 * (or dY's, for dW). */
static gsize
w4_lay (const Wino4 *wi)
{
  return MAX ((gsize) wi->hp * wi->wp * wi->ci,
              (gsize) 16 * wi->tiles * wi->co);
}

/* Floats of a thread's scratch: a laid-out sample, V and M (E for dW). */
static gsize
w4_per_thread (const Wino4 *wi)
{
  return w4_lay (wi) + 36 * (wi->kv + wi->km);
}

/* 8 floats, for the layouts' transposes: 8 x 8 blocks take 24 shuffles
 * within AVX2's registers (16 x 16 ones split across them). */
typedef float W4Half __attribute__ ((vector_size (8 * sizeof (float))));
typedef float W4HalfMem __attribute__ ((vector_size (8 * sizeof (float)),
                                        aligned (sizeof (float)), may_alias));
#define W4_HALF(p) (*(W4HalfMem *) (p))

/* r[0..8) = its transpose: r[i][j] becomes r[j][i]. */
static inline void
w4_transpose (W4Half *r)
{
  W4Half t[8];

  W4_UNROLL
  for (int i = 0; i < 4; i++)
    {
      t[i] = __builtin_shufflevector (r[i], r[i + 4], 0, 1, 2, 3, 8, 9, 10,
                                      11);
      t[i + 4] = __builtin_shufflevector (r[i], r[i + 4], 4, 5, 6, 7, 12, 13,
                                          14, 15);
    }
  W4_UNROLL
  for (int b = 0; b < 8; b += 4)
    W4_UNROLL
    for (int i = b; i < b + 2; i++)
      {
        r[i] = __builtin_shufflevector (t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12,
                                        13);
        r[i + 2] = __builtin_shufflevector (t[i], t[i + 2], 2, 3, 10, 11, 6,
                                            7, 14, 15);
      }
  W4_UNROLL
  for (int b = 0; b < 8; b += 2)
    {
      t[b] = __builtin_shufflevector (r[b], r[b + 1], 0, 8, 2, 10, 4, 12, 6,
                                      14);
      t[b + 1] = __builtin_shufflevector (r[b], r[b + 1], 1, 9, 3, 11, 5, 13,
                                          7, 15);
    }
  W4_UNROLL
  for (int i = 0; i < 8; i++)
    r[i] = t[i];
}

/* Where the 8 pixels from flat index p0 of a w-wide image go in a
 * wp-wide layout of c channels, moved down and right by off. */
static inline void
w4_pixels (gsize p0, int w, int wp, int off, int c, gsize *at)
{
  gsize y = p0 / w, x = p0 % w;

  for (int j = 0; j < 8; j++)
    {
      at[j] = ((y + off) * wp + x + off) * c;
      if (++x == (gsize) w)
        {
          x = 0;
          y++;
        }
    }
}

/* xt [hp][wp][C] = a sample x [C][h][w] for channels [c0, c1), pixel (y,
 * x) at (y + off, x + off), zeros around it. */
DF_HOT static void
w4_layout (const float *restrict x, int C, int h, int w, int off, int hp,
           int wp, int c0, int c1, float *restrict xt)
{
  gsize P = (gsize) h * w, p0 = 0, nc = (gsize) (c1 - c0) * sizeof (float);

  for (int y = 0; y < hp; y++)
    for (int xx = 0; xx < wp; xx++)
      if (y < off || y >= h + off || xx < off || xx >= w + off)
        memset (xt + ((gsize) y * wp + xx) * C + c0, 0, nc);

  for (; p0 + 8 <= P; p0 += 8)
    {
      gsize at[8];

      w4_pixels (p0, w, wp, off, C, at);
      for (int c = c0; c < c1; c += 8)
        {
          W4Half r[8];

          W4_UNROLL
          for (int i = 0; i < 8; i++)
            r[i] = W4_HALF (x + (c + i) * P + p0);
          w4_transpose (r);
          W4_UNROLL
          for (int j = 0; j < 8; j++)
            W4_HALF (xt + at[j] + c) = r[j];
        }
    }
  for (; p0 < P; p0++)
    {
      gsize at = ((p0 / w + off) * wp + p0 % w + off) * C;

      for (int c = c0; c < c1; c++)
        xt[at + c] = x[c * P + p0];
    }
}

/* One sample's outputs y [C][h][w] (channels [c0, c1)) from yt [4 th][4
 * tw][C], the part outside the image dropped; y = res + them with res, y
 * += them with add. */
DF_HOT static void
w4_unlayout (const Wino4 *wi, const float *restrict yt, int c0, int c1,
             const float *restrict res, gboolean add, float *restrict y)
{
  int C = wi->co, w = wi->w;
  gsize P = (gsize) wi->h * w, p0 = 0;

  for (; p0 + 8 <= P; p0 += 8)
    {
      gsize at[8];

      w4_pixels (p0, w, 4 * wi->tw, 0, C, at);
      for (int c = c0; c < c1; c += 8)
        {
          W4Half r[8];

          W4_UNROLL
          for (int j = 0; j < 8; j++)
            r[j] = W4_HALF (yt + at[j] + c);
          w4_transpose (r);
          W4_UNROLL
          for (int i = 0; i < 8; i++)
            {
              gsize q = (c + i) * P + p0;

              if (res != NULL)
                W4_HALF (y + q) = W4_HALF (res + q) + r[i];
              else if (add)
                W4_HALF (y + q) = W4_HALF (y + q) + r[i];
              else
                W4_HALF (y + q) = r[i];
            }
        }
    }
  for (; p0 < P; p0++)
    {
      gsize at = ((p0 / w) * 4 * wi->tw + p0 % w) * C;

      for (int c = c0; c < c1; c++)
        {
          gsize q = c * P + p0;

          y[q] = res != NULL ? res[q] + yt[at + c]
                 : add ? y[q] + yt[at + c] : yt[at + c];
        }
    }
}

/* B^T d of a patch's 6 rows (or columns) d, into o. */
#define W4_BT(d, o) \
  do { \
      o[0] = 4.0f * d[0] - 5.0f * d[2] + d[4]; \
      o[1] = -4.0f * (d[1] + d[2]) + (d[3] + d[4]); \
      o[2] = 4.0f * (d[1] - d[2]) + (d[4] - d[3]); \
      o[3] = 2.0f * (d[3] - d[1]) + (d[4] - d[2]); \
      o[4] = 2.0f * (d[1] - d[3]) + (d[4] - d[2]); \
      o[5] = 4.0f * d[1] - 5.0f * d[3] + d[5]; \
  } while (0)

/* V[k][t0 + t][c] = (B^T d B)[k] for channels [c0, c1) and the tiles t
 * of a laid-out sample xt (w4_layout, off 1), d the 6x6 patch of tile t. */
DF_HOT static void
w4_input (const Wino4 *wi, const float *restrict xt, int c0, int c1,
          gsize t0, float *restrict v)
{
  int C = wi->ci;
  gsize rs = (gsize) wi->wp * C;

  for (int ty = 0; ty < wi->th; ty++)
    for (int tx = 0; tx < wi->tw; tx++)
      {
        gsize t = t0 + (gsize) ty * wi->tw + tx;
        const float *p = xt + ((gsize) 4 * ty * wi->wp + 4 * tx) * C;

        for (int c = c0; c < c1; c += W4_VL)
          {
            W4Vec u[6][6];

            /* Down each column j of the patch, then across each row. */
            W4_UNROLL
            for (int j = 0; j < 6; j++)
              {
                W4Vec d[6], o[6];

                W4_UNROLL
                for (int i = 0; i < 6; i++)
                  d[i] = W4_AT (p + i * rs + j * C + c);
                W4_BT (d, o);
                W4_UNROLL
                for (int i = 0; i < 6; i++)
                  u[i][j] = o[i];
              }
            W4_UNROLL
            for (int i = 0; i < 6; i++)
              {
                W4Vec o[6];
                float *vi = v + 6 * i * wi->kv + t * C + c;

                W4_BT (u[i], o);
                W4_UNROLL
                for (int j = 0; j < 6; j++)
                  W4_AT (vi + j * wi->kv) = o[j];
              }
          }
      }
}

/* A^T m of 6 rows (or columns) m, into o. */
#define W4_AT6(m, o) \
  do { \
      o[0] = m[0] + (m[1] + m[2]) + (m[3] + m[4]); \
      o[1] = (m[1] - m[2]) + 2.0f * (m[3] - m[4]); \
      o[2] = (m[1] + m[2]) + 4.0f * (m[3] + m[4]); \
      o[3] = (m[1] - m[2]) + 8.0f * (m[3] - m[4]) + m[5]; \
  } while (0)

/* yt [4 th][4 tw][Co] = A^T M A (+ bias, + emb per channel) for output
 * channels [o0, o1) of the tiles from t0 of M (one sample's); bias and
 * emb may be NULL. */
DF_HOT static void
w4_output (const Wino4 *wi, const float *restrict m, gsize t0, int o0,
           int o1, const float *bias, const float *emb, float *restrict yt)
{
  int C = wi->co, wo = 4 * wi->tw;

  for (int ty = 0; ty < wi->th; ty++)
    for (int tx = 0; tx < wi->tw; tx++)
      {
        gsize t = t0 + (gsize) ty * wi->tw + tx;

        for (int o = o0; o < o1; o += W4_VL)
          {
            W4Vec s[4][6], bo = { 0 };

            if (bias != NULL)
              bo = W4_AT (bias + o);
            W4_UNROLL
            for (int j = 0; j < 6; j++)
              {
                W4Vec d[6], r[4];

                W4_UNROLL
                for (int i = 0; i < 6; i++)
                  d[i] = W4_AT (m + (6 * i + j) * wi->km + t * C + o);
                W4_AT6 (d, r);
                W4_UNROLL
                for (int i = 0; i < 4; i++)
                  s[i][j] = r[i];
              }
            W4_UNROLL
            for (int i = 0; i < 4; i++)
              {
                W4Vec r[4];
                float *y = yt + ((gsize) (4 * ty + i) * wo + 4 * tx) * C + o;

                W4_AT6 (s[i], r);
                W4_UNROLL
                for (int j = 0; j < 4; j++)
                  {
                    r[j] = r[j] + bo;
                    if (emb != NULL)
                      r[j] = r[j] + W4_AT (emb + o);
                    W4_AT (y + j * C) = r[j];
                  }
              }
          }
      }
}

/* A y of a tile's 4 rows (or columns) y, into o: the forward's A^T
 * transposed. */
#define W4_A4(y, o) \
  do { \
      o[0] = y[0]; \
      o[1] = (y[0] + y[2]) + (y[1] + y[3]); \
      o[2] = (y[0] + y[2]) - (y[1] + y[3]); \
      o[3] = (y[0] + 4.0f * y[2]) + 2.0f * (y[1] + 4.0f * y[3]); \
      o[4] = (y[0] + 4.0f * y[2]) - 2.0f * (y[1] + 4.0f * y[3]); \
      o[5] = y[3]; \
  } while (0)

/* E[k][t0 + t][o] = (A dY A^T)[k], the gradient of M, for channels [o0,
 * o1) and the tiles t of a laid-out dY yt (w4_layout, off 0, 4 th by 4
 * tw, zeros outside the image). */
DF_HOT static void
w4_dy (const Wino4 *wi, const float *restrict yt, int o0, int o1, gsize t0,
       float *restrict e)
{
  int C = wi->co, wo = 4 * wi->tw;

  for (int ty = 0; ty < wi->th; ty++)
    for (int tx = 0; tx < wi->tw; tx++)
      {
        gsize t = t0 + (gsize) ty * wi->tw + tx;
        const float *p = yt + ((gsize) 4 * ty * wo + 4 * tx) * C;

        for (int o = o0; o < o1; o += W4_VL)
          {
            W4Vec u[6][4];

            W4_UNROLL
            for (int j = 0; j < 4; j++)
              {
                W4Vec d[4], r[6];

                W4_UNROLL
                for (int i = 0; i < 4; i++)
                  d[i] = W4_AT (p + ((gsize) i * wo + j) * C + o);
                W4_A4 (d, r);
                W4_UNROLL
                for (int i = 0; i < 6; i++)
                  u[i][j] = r[i];
              }
            W4_UNROLL
            for (int i = 0; i < 6; i++)
              {
                W4Vec r[6];
                float *ei = e + 6 * i * wi->km + t * C + o;

                W4_A4 (u[i], r);
                W4_UNROLL
                for (int j = 0; j < 6; j++)
                  W4_AT (ei + j * wi->km) = r[j];
              }
          }
      }
}

/* G g of a kernel's 3 rows (or columns) g, into o. */
#define W4_G(g, o) \
  do { \
      o[0] = 0.25f * g[0]; \
      o[1] = (-1.0f / 6) * (g[0] + g[1] + g[2]); \
      o[2] = (-1.0f / 6) * (g[0] - g[1] + g[2]); \
      o[3] = (1.0f / 24) * g[0] + (1.0f / 12) * g[1] + (1.0f / 6) * g[2]; \
      o[4] = (1.0f / 24) * g[0] - (1.0f / 12) * g[1] + (1.0f / 6) * g[2]; \
      o[5] = g[2]; \
  } while (0)

/* U [36][Ci][Co] = G g G^T of each kernel g; w and flip as for
 * wino_weights.  The taps go to g [Ci][9][Co] first (w [Co][Ci 9] in 8 x 8
 * transposes, or the flipped kernel an input channel at a time), so that
 * the transforms read 16 output channels at once; g: 9 Ci Co floats. */
DF_HOT static void
w4_weights (const Wino4 *wi, const float *w, gboolean flip, float *u,
            float *g)
{
  int ci = wi->ci, co = wi->co;
  gsize ck = (gsize) ci * 9;
  gboolean par = (gsize) co * ci * 36 > DF_PAR_MIN;

  if (flip)
    {
      /* Kernel (o, c) is the forward's (c, o), w [Ci][Co][9] here,
       * rotated by 180 degrees. */
#pragma omp parallel for schedule(static) if (par)
      for (int c = 0; c < ci; c++)
        for (int o = 0; o < co; o++)
          for (int j = 0; j < 9; j++)
            g[((gsize) c * 9 + 8 - j) * co + o] = w[((gsize) c * co + o) * 9
                                                    + j];
    }
  else
    {
#pragma omp parallel for schedule(static) if (par)
      for (int o = 0; o < co; o += 8)
        for (gsize q = 0; q < ck; q += 8)
          {
            W4Half r[8];

            W4_UNROLL
            for (int i = 0; i < 8; i++)
              r[i] = W4_HALF (w + (o + i) * ck + q);
            w4_transpose (r);
            W4_UNROLL
            for (int j = 0; j < 8; j++)
              W4_HALF (g + (q + j) * co + o) = r[j];
          }
    }

#pragma omp parallel for schedule(static) if (par)
  for (int c = 0; c < ci; c++)
    for (int o = 0; o < co; o += W4_VL)
      {
        W4Vec gg[6][3];

        W4_UNROLL
        for (int j = 0; j < 3; j++)
          {
            W4Vec d[3], r[6];

            W4_UNROLL
            for (int i = 0; i < 3; i++)
              d[i] = W4_AT (g + ((gsize) c * 9 + 3 * i + j) * co + o);
            W4_G (d, r);
            W4_UNROLL
            for (int i = 0; i < 6; i++)
              gg[i][j] = r[i];
          }
        W4_UNROLL
        for (int i = 0; i < 6; i++)
          {
            W4Vec r[6];

            W4_G (gg[i], r);
            W4_UNROLL
            for (int j = 0; j < 6; j++)
              W4_AT (u + (6 * i + j) * wi->ku + (gsize) c * co + o) = r[j];
          }
      }
}

/* G^T m of a transform's 6 rows (or columns) m, into o. */
#define W4_GT(m, o) \
  do { \
      o[0] = 0.25f * m[0] + (-1.0f / 6) * (m[1] + m[2]) \
             + (1.0f / 24) * (m[3] + m[4]); \
      o[1] = (1.0f / 6) * (m[2] - m[1]) + (1.0f / 12) * (m[3] - m[4]); \
      o[2] = (-1.0f / 6) * (m[1] + m[2]) + (1.0f / 6) * (m[3] + m[4]) \
             + m[5]; \
  } while (0)

/* dw [Co,Ci,3,3] += G^T dU G of du [36][Ci][Co]: per input channel, by
 * blocks of output channels; the 9 taps of 16 kernels go to dw one by
 * one. */
DF_HOT static void
w4_dw_finish (const Wino4 *wi, const float *du, float *dw)
{
  int ci = wi->ci, co = wi->co;

#pragma omp parallel for schedule(static) if ((gsize) co * ci * 36 > DF_PAR_MIN)
  for (int c = 0; c < ci; c++)
    for (int o = 0; o < co; o += W4_VL)
      {
        W4Vec h[3][6];
        float taps[9][W4_VL];

        W4_UNROLL
        for (int j = 0; j < 6; j++)
          {
            W4Vec d[6], r[3];

            W4_UNROLL
            for (int i = 0; i < 6; i++)
              d[i] = W4_AT (du + (6 * i + j) * wi->ku + (gsize) c * co + o);
            W4_GT (d, r);
            W4_UNROLL
            for (int i = 0; i < 3; i++)
              h[i][j] = r[i];
          }
        W4_UNROLL
        for (int i = 0; i < 3; i++)
          {
            W4Vec r[3];

            W4_GT (h[i], r);
            W4_UNROLL
            for (int j = 0; j < 3; j++)
              W4_AT (taps[3 * i + j]) = r[j];
          }
        for (int l = 0; l < W4_VL; l++)
          {
            float *d = dw + ((gsize) (o + l) * ci + c) * 9;

            for (int k = 0; k < 9; k++)
              d[k] += taps[k][l];
          }
      }
}

/* A unit's V: for its samples from s0 (the batch's n may cut the group
 * short), channels [c0, c1), each laid out in xt first. */
static void
w4_unit_input (const Wino4 *wi, const float *x, int n, int s0, int c0,
               int c1, float *xt, float *v)
{
  for (int s = s0; s < MIN (s0 + wi->group, n); s++)
    {
      w4_layout (x + s * wi->x_sample, wi->ci, wi->h, wi->w, 1, wi->hp,
                 wi->wp, c0, c1, xt);
      w4_input (wi, xt, c0, c1, (gsize) (s - s0) * wi->tiles, v);
    }
}

/* A unit's outputs from its M for the samples s0 .. s0 + group under n,
 * channels [o0, o1), each through yt. */
static void
w4_unit_output (const Wino4 *wi, const float *m, int n, int s0, int o0,
                int o1, const WinoOut *out, float *y, float *yt)
{
  for (int s = s0; s < MIN (s0 + wi->group, n); s++)
    {
      const float *emb = out->emb != NULL ? out->emb + (gsize) s * wi->co
                                          : NULL;
      const float *res = out->res != NULL ? out->res + s * wi->y_sample
                                          : NULL;

      w4_output (wi, m, (gsize) (s - s0) * wi->tiles, o0, o1, out->bias,
                 emb, yt);
      w4_unlayout (wi, yt, o0, o1, res, out->add, y + s * wi->y_sample);
    }
}

/* M[k] [T,Co] = V[k] [T,Ci] U[k] [Ci,Co] for transforms [k0, k1) of a
 * unit of gs samples: a GEMM a sample, so that a sample's products are
 * the same wherever it is in the batch (OpenBLAS may round a row by
 * where it falls in its blocks), one U[k] for all of them while it is in
 * cache. */
static void
w4_gemms (const Wino4 *wi, const float *u, const float *v, int gs, int k0,
          int k1, float *m)
{
  gsize tc = (gsize) wi->tiles * wi->ci, to = (gsize) wi->tiles * wi->co;

  for (int k = k0; k < k1; k++)
    for (int s = 0; s < gs; s++)
      df_sgemm (DF_NO_TRANS, DF_NO_TRANS, wi->tiles, wi->co, wi->ci, 1.0f,
                v + k * wi->kv + s * tc, wi->ci,
                u + k * wi->ku, wi->co, 0.0f,
                m + k * wi->km + s * to, wi->co);
}

/* y (+)= the convolution of x [N,Ci,H,W] by the kernel whose transform is
 * u (w4_weights), with what out asks for; work: threads x w4_per_thread
 * floats.  With fewer units than threads, a unit's channel blocks,
 * transforms and output blocks are spread over the threads in turn, on
 * the first thread's V and M. */
DF_HOT static void
w4_run (const Wino4 *wi, const float *x, int n, const float *u,
        const WinoOut *out, float *y, float *work)
{
  gsize per_thread = w4_per_thread (wi), lay = w4_lay (wi);
  int units = (n + wi->group - 1) / wi->group;

  if (units >= omp_get_max_threads ())
    {
#pragma omp parallel for schedule(static)
      for (int un = 0; un < units; un++)
        {
          float *xt = work + per_thread * omp_get_thread_num ();
          float *v = xt + lay, *m = v + 36 * wi->kv;
          int gs = MIN (wi->group, n - un * wi->group);

          w4_unit_input (wi, x, n, un * wi->group, 0, wi->ci, xt, v);
          w4_gemms (wi, u, v, gs, 0, 36, m);
          w4_unit_output (wi, m, n, un * wi->group, 0, wi->co, out, y, xt);
        }
      return;
    }

  for (int un = 0; un < units; un++)
    {
      float *v = work + lay, *m = v + 36 * wi->kv;
      int gs = MIN (wi->group, n - un * wi->group);

#pragma omp parallel for schedule(static)
      for (int c = 0; c < wi->ci; c += W4_VL)
        w4_unit_input (wi, x, n, un * wi->group, c, c + W4_VL,
                       work + per_thread * omp_get_thread_num (), v);
#pragma omp parallel for schedule(static)
      for (int k = 0; k < 36; k++)
        w4_gemms (wi, u, v, gs, k, k + 1, m);
#pragma omp parallel for schedule(static)
      for (int o = 0; o < wi->co; o += W4_VL)
        w4_unit_output (wi, m, n, un * wi->group, o, o + W4_VL, out, y,
                        work + per_thread * omp_get_thread_num ());
    }
}

/* Floats of w4_weight_grad's scratch for n samples and threads (wi from
 * w4_init with W4_DW_ROWS). */
static gsize
w4_dw_scratch (const Wino4 *wi, int n, int threads)
{
  int n_runs = (n + WINO_DW_SAMPLES - 1) / WINO_DW_SAMPLES;

  return (gsize) threads * w4_per_thread (wi)
         + (gsize) n_runs * w4_u_floats (wi);
}

/* dU[k][c][o] = sum over tiles t of V[k][t][c] E[k][t][o]: the gradient
 * of U, 36 GEMMs a group of samples of K = their tiles; then dw += G^T dU
 * G.  x and dy as for wino_weight_grad; a unit is a run of
 * WINO_DW_SAMPLES samples, its groups wi->group samples (the last may be
 * shorter), and the runs' partial dU are summed in order, so dW does not
 * depend on the thread count.  work: w4_dw_scratch floats. */
DF_HOT static void
w4_weight_grad (const Wino4 *wi, const float *x, const float *dy, int n,
                float *dw, float *work, int threads)
{
  int ci = wi->ci, co = wi->co;
  int n_runs = (n + WINO_DW_SAMPLES - 1) / WINO_DW_SAMPLES;
  gsize nu = w4_u_floats (wi), cc = (gsize) ci * co;
  gsize per_thread = w4_per_thread (wi);
  gsize lay = w4_lay (wi);
  float *du = work + per_thread * threads;

#pragma omp parallel for schedule(static)
  for (int run = 0; run < n_runs; run++)
    {
      int s0 = run * WINO_DW_SAMPLES, s1 = MIN (s0 + WINO_DW_SAMPLES, n);
      float *xt = work + per_thread * omp_get_thread_num ();
      float *v = xt + lay, *e = v + 36 * wi->kv;
      float *dur = du + run * nu;

      for (int sg = s0; sg < s1; sg += wi->group)
        {
          int sg1 = MIN (sg + wi->group, s1), T = (sg1 - sg) * wi->tiles;

          for (int s = sg; s < sg1; s++)
            {
              gsize t0 = (gsize) (s - sg) * wi->tiles;

              w4_layout (x + s * wi->x_sample, ci, wi->h, wi->w, 1, wi->hp,
                         wi->wp, 0, ci, xt);
              w4_input (wi, xt, 0, ci, t0, v);
              w4_layout (dy + s * wi->y_sample, co, wi->h, wi->w, 0,
                         4 * wi->th, 4 * wi->tw, 0, co, xt);
              w4_dy (wi, xt, 0, co, t0, e);
            }
          /* dU[run][k] [Ci,Co] (+)= V[k]^T E[k] */
          for (int k = 0; k < 36; k++)
            df_sgemm (DF_TRANS, DF_NO_TRANS, ci, co, T, 1.0f, v + k * wi->kv,
                      ci, e + k * wi->km, co, sg == s0 ? 0.0f : 1.0f,
                      dur + k * wi->ku, co);
        }
    }

  /* The runs' dU summed in order into the first's, a transform a unit. */
#pragma omp parallel for schedule(static) if (n_runs > 1 && 36 * cc > DF_PAR_MIN)
  for (int k = 0; k < 36; k++)
    for (int run = 1; run < n_runs; run++)
      {
        float *restrict d0 = du + k * wi->ku;
        const float *restrict dr = du + run * nu + k * wi->ku;

        for (gsize i = 0; i < cc; i++)
          d0[i] += dr[i];
      }
  w4_dw_finish (wi, du, dw);
}

/* "Same" stride-1 convolutions (Ho = H, Wo = W, kh = kw, pads summing to
 * kh - 1, 1x1 ones included) take the shifted form backward too. */
static gboolean
conv_backward_shifted (const ConvGeom *c, int pad_hi)
{
  return c->stride == 1 && c->kh == c->kw && c->pad + pad_hi == c->kh - 1;
}

/* The shifted backward.  dY is padded to dyp [Co,N,Hp,Wp] with pad_hi
 * zeros before and pad_lo after, and x to xpt [Ci,N,Hp,Wp] as in the
 * forward, both channel-major so that one channel's planes for the whole
 * batch are a single run:
 *  - dW: tap (i, j) is dW_tap [Co,Ci] = dyp [Co,K] xpt^T shifted by
 *    (i - pad_hi) Wp + j - pad_hi, K running over every sample's plane in
 *    order (the zero padding of dyp kills the cross-row and cross-sample
 *    products): one GEMM of K ~ 16 Hp Wp per (run of samples, tap), the
 *    runs summed in order whatever the thread count.
 *  - dx is the transposed convolution: a shifted convolution of dyp by the
 *    flipped, transposed kernel, tile by tile as the forward, each (sample,
 *    tile of rows) owning its part of dx. */
DF_HOT static void
conv2d_backward_shifted (DfGraph *g, DfRecord *r, const ConvGeom *c)
{
  DfTensor *x = r->in[0], *w = r->in[1];
  float *dx = df_grad_or_null (x);
  float *dw = df_grad_or_null (w);               /* [Co,Ci,kh,kw] */
  const float *dy = r->out->grad;                /* [N,Co,H,W] */
  int n = x->shape[0], pad_hi = r->iarg[1], taps = c->kh * c->kw;
  int n_tiles, tile_rows, n_runs, threads = omp_get_max_threads ();
  gsize p = (gsize) c->ho * c->wo, plane = (gsize) c->hp * c->wp;
  gsize ld = (gsize) n * plane, wsize = (gsize) taps * c->co * c->ci;
  gsize per_thread;
  float *work, *dyp, *xpt, *wt, *acc;
  ConvGeom t;

  /* The transposed convolution's geometry: Co -> Ci on the same planes. */
  t = *c;
  t.ci = c->co;
  t.co = c->ci;
  t.h = c->ho;
  t.w = c->wo;
  t.ho = c->h;
  t.wo = c->w;
  t.pad = pad_hi;
  n_tiles = MAX (1, (int) ((p + CONV_TILE_P - 1) / CONV_TILE_P));
  tile_rows = (t.ho + n_tiles - 1) / n_tiles;
  n_tiles = (t.ho + tile_rows - 1) / tile_rows;
  per_thread = (gsize) t.co * tile_rows * t.wp;

  /* Workspace: dyp [Co,N,Hp,Wp], xpt [Ci,N,Hp,Wp] (dW only), the weights
   * by tap (dx: [taps][Ci,Co] flipped; dW: [taps][Co,Ci] results), and
   * [threads][per_thread] tiles (dx only). */
  n_runs = (n + CONV_DW_SAMPLES - 1) / CONV_DW_SAMPLES;
  work = df_graph_workspace (g, (gsize) c->co * ld
                                + (dw != NULL ? (gsize) c->ci * ld : 0)
                                + wsize * (dw != NULL ? n_runs : 1)
                                + (dx != NULL ? per_thread * threads : 0));
  dyp = work;
  xpt = dyp + (gsize) c->co * ld;
  wt = xpt + (dw != NULL ? (gsize) c->ci * ld : 0);
  acc = wt + wsize * (dw != NULL ? n_runs : 1);
  pad_planes (dy, n, c->co, c->ho, c->wo, c->hp, c->wp, pad_hi, TRUE, dyp);

  if (dw != NULL)
    {
      int first = pad_hi * c->wp + pad_hi;

      pad_planes (x->data, n, c->ci, c->h, c->w, c->hp, c->wp, c->pad, TRUE,
                  xpt);

      /* wt[run][tap][Co,Ci] = dyp [Co,K] (xpt shifted)^T over the run's
       * samples; a unit is (run, tap). */
#pragma omp parallel for schedule(static)
      for (int u = 0; u < n_runs * taps; u++)
        {
          int run = u / taps, tap = u % taps;
          int s0 = run * CONV_DW_SAMPLES, s1 = MIN (s0 + CONV_DW_SAMPLES, n);
          int i = tap / c->kw, j = tap % c->kw;
          gsize k = (gsize) (s1 - s0 - 1) * plane
                    + (gsize) (c->ho - 1) * c->wp + c->wo;
          gsize off = (gsize) s0 * plane;

          df_sgemm (DF_NO_TRANS, DF_TRANS, c->co, c->ci, k, 1.0f,
                    dyp + off + first, ld, xpt + off + (gsize) i * c->wp + j,
                    ld, 0.0f, wt + ((gsize) run * taps + tap) * c->co * c->ci,
                    c->ci);
        }

      /* dw [Co,Ci,kh,kw] += the runs' wt in order; a unit is an output
       * channel. */
#pragma omp parallel for schedule(static) if (wsize > DF_PAR_MIN)
      for (int o = 0; o < c->co; o++)
        for (int ch = 0; ch < c->ci; ch++)
          for (int tap = 0; tap < taps; tap++)
            {
              float *d = &dw[((gsize) o * c->ci + ch) * taps + tap];

              for (int run = 0; run < n_runs; run++)
                *d += wt[(((gsize) run * taps + tap) * c->co + o) * c->ci + ch];
            }
    }

  if (dx != NULL)
    {
      gsize xs = (gsize) c->ci * c->h * c->w;

      /* wt[taps - 1 - tap][Ci,Co] = W[:, :, tap]^T, flipped */
      for (int o = 0; o < c->co; o++)
        for (int ch = 0; ch < c->ci; ch++)
          for (int tap = 0; tap < taps; tap++)
            wt[((gsize) (taps - 1 - tap) * c->ci + ch) * c->co + o] =
              w->data[((gsize) o * c->ci + ch) * taps + tap];

      /* dx[s, :, rows] += the tile's sum over taps; a unit is (sample, tile
       * of rows). */
#pragma omp parallel for schedule(static)
      for (int u = 0; u < n * n_tiles; u++)
        {
          int s = u / n_tiles, y0 = (u % n_tiles) * tile_rows;
          int y1 = MIN (y0 + tile_rows, t.ho);
          int nq = (y1 - y0 - 1) * t.wp + t.wo;
          float *tile = acc + per_thread * omp_get_thread_num ();
          float *dxs = dx + s * xs + (gsize) y0 * t.wo;

          conv_tile_shifted (&t, dyp + s * plane, ld, wt, y0, y1, tile);
          for (int ch = 0; ch < t.co; ch++)
            for (int rr = 0; rr < y1 - y0; rr++)
              {
                const float *src = tile + (gsize) ch * nq + (gsize) rr * t.wp;
                float *dst = dxs + (gsize) ch * c->h * c->w
                             + (gsize) rr * t.wo;

                for (int ox = 0; ox < t.wo; ox++)
                  dst[ox] += src[ox];
              }
        }
    }
}

/* The backward of a "same" 3x3 convolution in Winograd form (see
 * conv_winograd): dW by wino_weight_grad from x and dY, dx as the
 * transposed convolution's forward of dY by the flipped kernel, added into
 * dx.  The two share one scratch, one after the other. */
static void
conv2d_backward_winograd (DfGraph *g, DfRecord *r, const ConvGeom *c)
{
  DfTensor *x = r->in[0], *w = r->in[1];
  gboolean fresh;
  float *dx = df_grad_fresh_or_null (x, &fresh);
  float *dw = df_grad_or_null (w);               /* [Co,Ci,3,3] */
  const float *dy = r->out->grad;                /* [N,Co,H,W] */
  int n = x->shape[0], threads = omp_get_max_threads ();
  gsize cc16 = (gsize) 16 * c->co * c->ci, dw_need = 0, dx_need = 0;
  float *work;
  Wino ww, wx;

  /* dW: Ci in, Co out; dx: Co in, Ci out. */
  wino_init (&ww, c->ci, c->co, c->h, c->w);
  wino_init (&wx, c->co, c->ci, c->h, c->w);
  if (dw != NULL)
    dw_need = wino_dw_scratch (&ww, n, threads);
  if (dx != NULL)
    dx_need = cc16 + wino_per_thread (&wx) * threads;
  work = df_graph_workspace (g, MAX (dw_need, dx_need));

  if (dw != NULL)
    wino_weight_grad (&ww, x->data, dy, n, dw, work, threads);
  if (dx != NULL)
    {
      wino_weights (&wx, w->data, TRUE, work, work + cc16);
      WinoOut out = { NULL, NULL, NULL, !fresh };

      wino_run (&wx, dy, n, work, &out, dx, work + cc16);
    }
}

/* The same in F(4x4, 3x3) form (see conv_winograd4). */
static void
conv2d_backward_winograd4 (DfGraph *g, DfRecord *r, const ConvGeom *c)
{
  DfTensor *x = r->in[0], *w = r->in[1];
  gboolean fresh;
  float *dx = df_grad_fresh_or_null (x, &fresh);
  float *dw = df_grad_or_null (w);               /* [Co,Ci,3,3] */
  const float *dy = r->out->grad;                /* [N,Co,H,W] */
  int n = x->shape[0], threads = omp_get_max_threads ();
  gsize nu, cc9 = (gsize) 9 * c->co * c->ci, dw_need = 0, dx_need = 0;
  float *work;
  Wino4 ww, wx;

  /* dW: Ci in, Co out; dx: Co in, Ci out. */
  w4_init (&ww, c->ci, c->co, c->h, c->w, W4_DW_ROWS, WINO_DW_SAMPLES);
  w4_init (&wx, c->co, c->ci, c->h, c->w, W4_ROWS, G_MAXINT);
  nu = w4_u_floats (&wx);
  if (dw != NULL)
    dw_need = w4_dw_scratch (&ww, n, threads);
  if (dx != NULL)
    dx_need = nu + MAX (cc9, w4_per_thread (&wx) * threads);
  work = df_graph_workspace (g, MAX (dw_need, dx_need));

  if (dw != NULL)
    w4_weight_grad (&ww, x->data, dy, n, dw, work, threads);
  if (dx != NULL)
    {
      WinoOut out = { NULL, NULL, NULL, !fresh };

      w4_weights (&wx, w->data, TRUE, work, work + nu);
      w4_run (&wx, dy, n, work, &out, dx, work + nu);
    }
}

static void
conv2d_backward (DfGraph *g, DfRecord *r)
{
  ConvGeom c;
  float *db = df_grad_or_null (r->in[2]), *de = df_grad_or_null (r->in[3]);

  /* The residual's gradient is dY itself, given first as df_add's
   * backward would. */
  if (r->in[4] != NULL && r->in[4]->requires_grad)
    df_grad_accumulate (r->in[4], r->out->grad);

  blas_serial ();
  conv_geom (&c, r->in[0], r->in[1], r->iarg[0], r->iarg[2], r->iarg[1]);
  if (db != NULL || de != NULL)
    conv_bias_grad (r->out->grad, r->in[0]->shape[0], c.co,
                    (gsize) c.ho * c.wo, db, de);
  if (!conv_backward_shifted (&c, r->iarg[1]))
    {
      conv2d_backward_im2col (g, r);
      return;
    }

  /* (Not df_grad_or_null, which would zero dx before the Winograd form
   * could store into it fresh.) */
  if (!r->in[0]->requires_grad && !r->in[1]->requires_grad)
    return;
  if (conv_winograd4 (&c, r->iarg[1]))
    conv2d_backward_winograd4 (g, r, &c);
  else if (conv_winograd (&c, r->iarg[1]))
    conv2d_backward_winograd (g, r, &c);
  else
    conv2d_backward_shifted (g, r, &c);
}

/* The forward of a "same" 3x3 convolution in Winograd form (see
 * conv_winograd) into y, with what out asks for. */
static void
conv2d_forward_winograd (DfGraph *g, const ConvGeom *c, const DfTensor *x,
                         const DfTensor *w, const WinoOut *out, DfTensor *y)
{
  int n = x->shape[0];
  gsize cc16 = (gsize) 16 * c->co * c->ci, cc9 = (gsize) 9 * c->co * c->ci;
  float *u;
  Wino wi;
  Wino4 w4;

  /* Workspace: the kernel's transform, then the threads' scratch.  (The
   * caller took this form by conv_winograd, so the padding after is 1.) */
  if (conv_winograd4 (c, 1))
    {
      /* The taps' layout for w4_weights, then the threads' scratch, in
       * the same floats after U. */
      gsize nu;

      w4_init (&w4, c->ci, c->co, c->h, c->w, W4_ROWS, G_MAXINT);
      nu = w4_u_floats (&w4);
      u = df_graph_workspace (g, nu + MAX (cc9, w4_per_thread (&w4)
                                                 * omp_get_max_threads ()));
      w4_weights (&w4, w->data, FALSE, u, u + nu);
      w4_run (&w4, x->data, n, u, out, y->data, u + nu);
      return;
    }
  wino_init (&wi, c->ci, c->co, c->h, c->w);
  u = df_graph_workspace (g, cc16 + wino_per_thread (&wi)
                                    * omp_get_max_threads ());
  wino_weights (&wi, w->data, FALSE, u, u + cc16);
  wino_run (&wi, x->data, n, u, out, y->data, u + cc16);
}

double
df_conv2d_scratch (int n, int ci, int co, int k, int s, int threads)
{
  double plane = (s + 2.0) * (s + 2.0), fwd, bwd;
  Wino wi, wx;

  /* The shifted backward: dY and x padded, a weight copy per run. */
  if (k != 3 || s < 7)
    return (ci + co) * (double) n * plane
           + (double) ci * co * k * k * ceil ((double) n / CONV_DW_SAMPLES);

  /* Winograd: see conv2d_forward_winograd and conv2d_backward_winograd
   * (and the F(4x4) ones). */
  if (ci % W4_VL == 0 && co % W4_VL == 0)
    {
      Wino4 w4, w4x, w4w;

      w4_init (&w4, ci, co, s, s, W4_ROWS, G_MAXINT);
      w4_init (&w4x, co, ci, s, s, W4_ROWS, G_MAXINT);
      w4_init (&w4w, ci, co, s, s, W4_DW_ROWS, WINO_DW_SAMPLES);
      fwd = (double) w4_u_floats (&w4)
            + MAX (9.0 * co * ci, (double) w4_per_thread (&w4) * threads);
      bwd = MAX ((double) w4_dw_scratch (&w4w, n, threads),
                 (double) w4_u_floats (&w4x)
                 + MAX (9.0 * co * ci,
                        (double) w4_per_thread (&w4x) * threads));
      return MAX (fwd, bwd);
    }
  wino_init (&wi, ci, co, s, s);
  wino_init (&wx, co, ci, s, s);
  fwd = 16.0 * co * ci + (double) wino_per_thread (&wi) * threads;
  bwd = MAX ((double) wino_dw_scratch (&wi, n, threads),
             16.0 * co * ci + (double) wino_per_thread (&wx) * threads);
  return MAX (fwd, bwd);
}

DF_HOT static DfTensor *
conv2d (DfGraph *g, DfTensor *x, DfTensor *w, DfTensor *b, DfTensor *e,
        DfTensor *res, int stride, int pad_lo, int pad_hi)
{
  ConvGeom c;
  DfTensor *y;
  int n, n_tiles, tile_rows, threads;
  gboolean pw, shifted;
  gsize p, kk, xs, xps = 0, tile_max, per_thread = 0;
  float *work = NULL, *xp = NULL, *wt = NULL;

  g_return_val_if_fail (g != NULL && x != NULL && w != NULL, NULL);
  g_return_val_if_fail (x->ndim == 4 && w->ndim == 4, NULL);
  g_return_val_if_fail (w->shape[1] == x->shape[1], NULL);
  g_return_val_if_fail (b == NULL || (int) b->size == w->shape[0], NULL);
  g_return_val_if_fail (e == NULL || (e->ndim == 2 && e->shape[0] == x->shape[0]
                                      && e->shape[1] == w->shape[0]), NULL);
  g_return_val_if_fail (res == NULL || (res->ndim == 4
                                        && res->shape[0] == x->shape[0]
                                        && res->shape[1] == w->shape[0]),
                        NULL);
  g_return_val_if_fail (stride >= 1 && pad_lo >= 0 && pad_hi >= 0, NULL);
  g_return_val_if_fail (x->shape[2] + pad_lo + pad_hi >= w->shape[2]
                        && x->shape[3] + pad_lo + pad_hi >= w->shape[3], NULL);

  blas_serial ();
  conv_geom (&c, x, w, stride, pad_lo, pad_hi);
  g_return_val_if_fail (res == NULL || (res->shape[2] == c.ho
                                        && res->shape[3] == c.wo), NULL);
  pw = conv_pointwise (&c, pad_hi);
  n = x->shape[0];
  p = (gsize) c.ho * c.wo;
  kk = (gsize) c.ci * c.kh * c.kw;
  xs = (gsize) c.ci * c.h * c.w;
  /* Tiles of tile_rows output rows; the last may be shorter. */
  n_tiles = MAX (1, (int) ((p + CONV_TILE_P - 1) / CONV_TILE_P));
  tile_rows = (c.ho + n_tiles - 1) / n_tiles;
  n_tiles = (c.ho + tile_rows - 1) / tile_rows;
  tile_max = (gsize) tile_rows * c.wo;
  y = df_graph_tensor_4d (g, n, c.co, c.ho, c.wo);
  if (!pw && conv_winograd (&c, pad_hi))
    {
      WinoOut out = { b != NULL ? b->data : NULL, e != NULL ? e->data : NULL,
                      res != NULL ? res->data : NULL, FALSE };

      conv2d_forward_winograd (g, &c, x, w, &out, y);
      goto record;
    }
  shifted = !pw && conv_shifted (&c);
  if (!pw)
    {
      /* Workspace: [threads][per_thread] tiles, the padded input
       * [N,Ci,Hp,Wp], and for the shifted form the weights by tap. */
      xps = (gsize) c.ci * c.hp * c.wp;
      per_thread = shifted ? (gsize) c.co * tile_rows * c.wp : kk * tile_max;
      threads = omp_get_max_threads ();
      work = df_graph_workspace (g, per_thread * threads + n * xps
                                    + (shifted ? kk * c.co : 0));
      xp = work + per_thread * threads;
      wt = xp + n * xps;
      pad_input (&c, x->data, n, xp);
      if (shifted)
        conv_weights_by_tap (&c, w->data, wt);
    }

  /* A unit is (sample, tile of output rows). */
#pragma omp parallel for schedule(static)
  for (int u = 0; u < n * n_tiles; u++)
    {
      int s = u / n_tiles, y0 = (u % n_tiles) * tile_rows;
      int y1 = MIN (y0 + tile_rows, c.ho), t = (y1 - y0) * c.wo;
      gsize p0 = (gsize) y0 * c.wo;
      const float *xn = x->data + s * xs;
      float *ys = y->data + (gsize) s * c.co * p + p0;
      float *tile = work + per_thread * omp_get_thread_num ();

      if (pw)
        df_sgemm (DF_NO_TRANS, DF_NO_TRANS, c.co, t, kk, 1.0f, w->data, kk,
                  xn + p0, p, 0.0f, ys, p);
      else if (shifted)
        {
          conv_tile_shifted (&c, xp + s * xps, xps / c.ci, wt, y0, y1, tile);
          conv_tile_store (&c, tile, y0, y1, b, ys, p);
        }
      else
        {
          /* y[:, tile] [Co,T] = W [Co,KK] col[:, tile] [KK,T] */
          im2col (&c, xp + s * xps, 0, c.ci, y0, y1, tile);
          df_sgemm (DF_NO_TRANS, DF_NO_TRANS, c.co, t, kk, 1.0f, w->data, kk,
                    tile, t, 0.0f, ys, p);
        }
      if (b != NULL && !shifted)
        for (int o = 0; o < c.co; o++)
          for (int q = 0; q < t; q++)
            ys[o * p + q] += b->data[o];
      if (e != NULL)
        conv_add_emb (ys, e->data + (gsize) s * c.co, c.co, t, p);
      if (res != NULL)
        {
          const float *rs = res->data + (ys - y->data);

          for (int o = 0; o < c.co; o++)
            for (int q = 0; q < t; q++)
              ys[o * p + q] = rs[o * p + q] + ys[o * p + q];
        }
    }

record:
  if (df_graph_wants (g, x, w, b, e) || df_graph_wants (g, res, NULL, NULL, NULL))
    {
      DfRecord *r = df_graph_push (g, conv2d_backward, y);

      r->in[0] = x;
      r->in[1] = w;
      r->in[2] = b;
      r->in[3] = e;
      r->in[4] = res;
      r->iarg[0] = stride;
      r->iarg[1] = pad_hi;
      r->iarg[2] = pad_lo;
    }
  return y;
}

DfTensor *
df_conv2d (DfGraph *g, DfTensor *x, DfTensor *w, DfTensor *b, int stride,
           int pad_lo, int pad_hi)
{
  return conv2d (g, x, w, b, NULL, NULL, stride, pad_lo, pad_hi);
}

DfTensor *
df_conv2d_emb (DfGraph *g, DfTensor *x, DfTensor *w, DfTensor *b,
               DfTensor *e, int stride, int pad_lo, int pad_hi)
{
  g_return_val_if_fail (e != NULL, NULL);
  return conv2d (g, x, w, b, e, NULL, stride, pad_lo, pad_hi);
}

DfTensor *
df_conv2d_add (DfGraph *g, DfTensor *x, DfTensor *w, DfTensor *b,
               DfTensor *res, int stride, int pad_lo, int pad_hi)
{
  g_return_val_if_fail (res != NULL, NULL);
  return conv2d (g, x, w, b, NULL, res, stride, pad_lo, pad_hi);
}

/* ---- group norm ---- */

/* *sd = sum of d[i], *sdx = sum of d[i] (x[i] - m) */
DF_HOT static void
sum_d_dx (const float *d, const float *x, gsize n, double m, double *sd,
          double *sdx)
{
  double a1[SUM_LANES] = { 0 }, a2[SUM_LANES] = { 0 };
  gsize i = 0;

  for (; i + SUM_LANES <= n; i += SUM_LANES)
    for (int l = 0; l < SUM_LANES; l++)
      {
        a1[l] += d[i + l];
        a2[l] += (double) d[i + l] * (x[i + l] - m);
      }
  for (; i < n; i++)
    {
      a1[i % SUM_LANES] += d[i];
      a2[i % SUM_LANES] += (double) d[i] * (x[i] - m);
    }
  *sd = lanes_total (a1);
  *sdx = lanes_total (a2);
}

/* The norm's y = x a + b for channel c of a group: a = rstd gamma, b =
 * beta - mean a, in float. */
static void
group_norm_coef (const float *gamma, const float *beta, int c, double mean,
                 double rstd, float *a, float *b)
{
  double gc = gamma != NULL ? gamma[c] : 1.0;
  double bc = beta != NULL ? beta[c] : 0.0;

  *a = (float) (rstd * gc);
  *b = (float) (bc - mean * rstd * gc);
}

/* Saved per (n, group): mean and 1 / sqrt (var + eps), in double.  iarg[1]:
 * SiLU follows (df_group_norm_silu), whose gradient dh = dy silu' (h) at the
 * norm's output h, recomputed from x, goes to the thread's scratch first. */
DF_HOT static void
group_norm_backward (DfGraph *g, DfRecord *r)
{
  DfTensor *x = r->in[0];
  const float *gamma = r->in[1] != NULL ? r->in[1]->data : NULL;
  const float *beta = r->in[2] != NULL ? r->in[2]->data : NULL;
  gboolean fresh;
  float *dx = df_grad_fresh_or_null (x, &fresh);
  float *dgamma = df_grad_or_null (r->in[1]);
  float *dbeta = df_grad_or_null (r->in[2]);
  const float *dy = r->out->grad;
  const double *stat = r->saved;                 /* [N,G,2] */
  int n = x->shape[0], ch = x->shape[1], groups = r->iarg[0];
  int cpg = ch / groups;
  gboolean silu = r->iarg[1];
  gsize s = x->size / ((gsize) n * ch);
  gsize m = (gsize) cpg * s;
  double *csum;                                  /* [N,C,2] */
  float *scratch;                                /* [threads][m] */

  csum = (double *) df_graph_workspace (g, 4 * (gsize) n * ch
                                           + (silu ? m * omp_get_max_threads ()
                                                   : 0));
  scratch = (float *) (csum + 2 * (gsize) n * ch);

  /* A unit is (n, group): per channel, sum dh and sum dh xhat (xhat's rstd
   * taken out), which give dgamma, dbeta (summed over n in sample order
   * below) and the group means dx needs; then
   * dx = rstd (g dh - mean (g dh) - xhat mean (g dh xhat)). */
#pragma omp parallel for schedule(static) if (x->size > DF_PAR_MIN)
  for (int ng = 0; ng < n * groups; ng++)
    {
      gsize base = (gsize) ng * m;
      double mean = stat[2 * ng], rstd = stat[2 * ng + 1];
      double sum1 = 0, sum2 = 0, k1, k2;
      int c0 = (ng % groups) * cpg, nc0 = (ng / groups) * ch + c0;
      const float *xg = x->data + base, *dh = dy + base;

      if (silu)
        {
          float *d = scratch + m * omp_get_thread_num ();

          for (int c = 0; c < cpg; c++)
            {
              float a, b;

              group_norm_coef (gamma, beta, c0 + c, mean, rstd, &a, &b);
              for (gsize q = c * s; q < (c + 1) * s; q++)
                d[q] = dh[q] * df_silu_slope (xg[q] * a + b);
            }
          dh = d;
        }

      for (int c = 0; c < cpg; c++)
        {
          double sd, sdx;

          sum_d_dx (dh + c * s, xg + c * s, s, mean, &sd, &sdx);
          csum[2 * (nc0 + c)] = sd;
          csum[2 * (nc0 + c) + 1] = sdx * rstd;
        }
      if (dx == NULL)
        continue;

      for (int c = 0; c < cpg; c++)
        {
          double gc = gamma != NULL ? gamma[c0 + c] : 1.0;

          sum1 += gc * csum[2 * (nc0 + c)];
          sum2 += gc * csum[2 * (nc0 + c) + 1];
        }
      k1 = sum1 / m;
      k2 = sum2 / m;

      /* dx = (rstd g) dh + a (x - mean) + b per channel, in float so that
       * it vectorises (x - mean first: no cancellation when the mean is
       * large) */
      for (int c = 0; c < cpg; c++)
        {
          double gc = gamma != NULL ? gamma[c0 + c] : 1.0;
          float ga = (float) (rstd * gc), mf = (float) mean;
          float a = (float) (-rstd * rstd * k2), b = (float) (-rstd * k1);
          const float *xc = xg + c * s, *dc = dh + c * s;
          float *dxc = dx + base + c * s;

          if (fresh)
            for (gsize q = 0; q < s; q++)
              dxc[q] = ga * dc[q] + (a * (xc[q] - mf) + b);
          else
            for (gsize q = 0; q < s; q++)
              dxc[q] += ga * dc[q] + (a * (xc[q] - mf) + b);
        }
    }

  /* dgamma, dbeta [C]: the per-sample sums, added in sample order. */
  if (dgamma != NULL || dbeta != NULL)
    for (int c = 0; c < ch; c++)
      {
        double sg = 0, sb = 0;

        for (int b = 0; b < n; b++)
          {
            sb += csum[2 * ((gsize) b * ch + c)];
            sg += csum[2 * ((gsize) b * ch + c) + 1];
          }
        if (dgamma != NULL)
          dgamma[c] += (float) sg;
        if (dbeta != NULL)
          dbeta[c] += (float) sb;
      }
}

DF_HOT static DfTensor *
group_norm (DfGraph *g, DfTensor *x, DfTensor *gamma, DfTensor *beta,
            int groups, float eps, gboolean silu)
{
  DfTensor *y;
  gboolean want;
  double *stat;
  int n, ch, cpg;
  gsize s, m;

  g_return_val_if_fail (g != NULL && x != NULL && x->ndim >= 2, NULL);
  g_return_val_if_fail (groups >= 1 && x->shape[1] % groups == 0, NULL);
  g_return_val_if_fail (gamma == NULL || (int) gamma->size == x->shape[1],
                        NULL);
  g_return_val_if_fail (beta == NULL || (int) beta->size == x->shape[1], NULL);

  n = x->shape[0];
  ch = x->shape[1];
  cpg = ch / groups;
  s = x->size / ((gsize) n * ch);
  m = (gsize) cpg * s;
  y = df_graph_tensor (g, x->ndim, x->shape);
  want = df_graph_wants (g, x, gamma, beta, NULL);
  stat = want ? df_graph_saved (g, sizeof (double) * 2 * n * groups)
              : (double *) df_graph_workspace (g, 4 * (gsize) n * groups);

  /* Per (n, group), contiguous [cpg,S]: two-pass mean and biased variance
   * in double, then y = x a + b (group_norm_coef), through SiLU or not. */
#pragma omp parallel for schedule(static)
  for (int ng = 0; ng < n * groups; ng++)
    {
      const float *xg = x->data + (gsize) ng * m;
      float *yg = y->data + (gsize) ng * m;
      double sum = 0, var = 0, mean, rstd;
      int c0 = (ng % groups) * cpg;

      sum = sum_f (xg, m);
      mean = sum / m;
      var = sum_sq_dev (xg, m, mean);
      rstd = 1.0 / sqrt (var / m + eps);
      stat[2 * ng] = mean;
      stat[2 * ng + 1] = rstd;

      for (int c = 0; c < cpg; c++)
        {
          float a, b;

          group_norm_coef (gamma != NULL ? gamma->data : NULL,
                           beta != NULL ? beta->data : NULL, c0 + c, mean,
                           rstd, &a, &b);
          if (silu)
            for (gsize q = c * s; q < (c + 1) * s; q++)
              yg[q] = df_silu_of (xg[q] * a + b);
          else
            for (gsize q = c * s; q < (c + 1) * s; q++)
              yg[q] = xg[q] * a + b;
        }
    }

  if (want)
    {
      DfRecord *r = df_graph_push (g, group_norm_backward, y);

      r->in[0] = x;
      r->in[1] = gamma;
      r->in[2] = beta;
      r->iarg[0] = groups;
      r->iarg[1] = silu;
      r->saved = stat;
    }
  return y;
}

DfTensor *
df_group_norm (DfGraph *g, DfTensor *x, DfTensor *gamma, DfTensor *beta,
               int groups, float eps)
{
  return group_norm (g, x, gamma, beta, groups, eps, FALSE);
}

DfTensor *
df_group_norm_silu (DfGraph *g, DfTensor *x, DfTensor *gamma, DfTensor *beta,
                    int groups, float eps)
{
  return group_norm (g, x, gamma, beta, groups, eps, TRUE);
}

/* ---- linear ---- */

/* Rows a sample contributes: x [N, R..., I] is N samples of R rows. */
static void
linear_rows (const DfTensor *x, int *samples, int *rows)
{
  int in = x->shape[x->ndim - 1];

  *samples = x->ndim >= 2 ? x->shape[0] : 1;
  *rows = x->size / in / *samples;
}

/* Below this many rows a sample, plain loops beat a GEMM call. */
#define LINEAR_GEMM_ROWS 8

DF_HOT static void
linear_backward (DfGraph *g, DfRecord *r)
{
  DfTensor *x = r->in[0], *w = r->in[1];
  float *dx = df_grad_or_null (x);               /* [N*R,I] */
  float *dw = df_grad_or_null (w);               /* [O,I] */
  float *db = df_grad_or_null (r->in[2]);        /* [O] */
  const float *dy = r->out->grad;                /* [N*R,O] */
  int in = w->shape[1], out = w->shape[0], samples, rows, total, n_rt;
  gboolean gemm;

  blas_serial ();
  linear_rows (x, &samples, &rows);
  total = rows * samples;
  gemm = rows >= LINEAR_GEMM_ROWS;
  n_rt = (rows + ROW_TILE - 1) / ROW_TILE;

  /* db: batch sums in a fixed order. */
  if (db != NULL)
    {
#pragma omp parallel for schedule(static) if ((gsize) total * out > DF_PAR_MIN)
      for (int o = 0; o < out; o++)
        {
          double sum = 0;

          for (int i = 0; i < total; i++)
            sum += dy[(gsize) i * out + o];
          db[o] += (float) sum;
        }
    }

  /* dW [O,I] += dY^T X over all rows; a unit is a block of W's rows. */
  if (dw != NULL && gemm)
    {
      int n_ot = (out + ROW_TILE - 1) / ROW_TILE;

#pragma omp parallel for schedule(static)
      for (int ot = 0; ot < n_ot; ot++)
        {
          int o0 = ot * ROW_TILE, ob = MIN (ROW_TILE, out - o0);

          df_sgemm (DF_TRANS, DF_NO_TRANS, ob, in, total, 1.0f, dy + o0, out,
                    x->data, in, 1.0f, dw + (gsize) o0 * in, in);
        }
    }
  else if (dw != NULL)
    {
#pragma omp parallel for schedule(static) if ((gsize) total * out * in > DF_PAR_MIN)
      for (int o = 0; o < out; o++)
        for (int i = 0; i < total; i++)
          {
            float d = dy[(gsize) i * out + o];
            const float *xr = x->data + (gsize) i * in;
            float *dwr = dw + (gsize) o * in;

            for (int k = 0; k < in; k++)
              dwr[k] += d * xr[k];
          }
    }

  /* dX = dY W; a unit is (sample, tile of rows). */
  if (dx != NULL && gemm)
    {
#pragma omp parallel for schedule(static)
      for (int u = 0; u < samples * n_rt; u++)
        {
          int s = u / n_rt, r0 = (u % n_rt) * ROW_TILE;
          int rt = MIN (ROW_TILE, rows - r0);
          gsize row = (gsize) s * rows + r0;

          df_sgemm (DF_NO_TRANS, DF_NO_TRANS, rt, in, out, 1.0f,
                    dy + row * out, out, w->data, in, 1.0f, dx + row * in, in);
        }
    }
  else if (dx != NULL)
    {
#pragma omp parallel for schedule(static) if ((gsize) total * out * in > DF_PAR_MIN)
      for (int i = 0; i < total; i++)
        for (int o = 0; o < out; o++)
          {
            float d = dy[(gsize) i * out + o];
            const float *wr = w->data + (gsize) o * in;
            float *dxr = dx + (gsize) i * in;

            for (int k = 0; k < in; k++)
              dxr[k] += d * wr[k];
          }
    }
}

DF_HOT DfTensor *
df_linear (DfGraph *g, DfTensor *x, DfTensor *w, DfTensor *b)
{
  DfTensor *y;
  int shape[DF_MAX_DIMS], in, out, samples, rows, n_rt;

  g_return_val_if_fail (g != NULL && x != NULL && w != NULL, NULL);
  g_return_val_if_fail (w->ndim == 2 && x->shape[x->ndim - 1] == w->shape[1],
                        NULL);
  g_return_val_if_fail (b == NULL || (int) b->size == w->shape[0], NULL);

  blas_serial ();
  in = w->shape[1];
  out = w->shape[0];
  memcpy (shape, x->shape, sizeof shape);
  shape[x->ndim - 1] = out;
  y = df_graph_tensor (g, x->ndim, shape);
  linear_rows (x, &samples, &rows);
  n_rt = (rows + ROW_TILE - 1) / ROW_TILE;

  /* y [R,O] = x [R,I] W^T [I,O] (+ b); a unit is (sample, tile of rows). */
  if (rows >= LINEAR_GEMM_ROWS)
    {
#pragma omp parallel for schedule(static)
      for (int u = 0; u < samples * n_rt; u++)
        {
          int s = u / n_rt, r0 = (u % n_rt) * ROW_TILE;
          int rt = MIN (ROW_TILE, rows - r0);
          gsize row = (gsize) s * rows + r0;
          float *yr = y->data + row * out;

          df_sgemm (DF_NO_TRANS, DF_TRANS, rt, out, in, 1.0f,
                    x->data + row * in, in, w->data, in, 0.0f, yr, out);
          if (b != NULL)
            for (int i = 0; i < rt; i++)
              for (int o = 0; o < out; o++)
                yr[(gsize) i * out + o] += b->data[o];
        }
    }
  else
    {
      gsize total = (gsize) rows * samples;

#pragma omp parallel for schedule(static) if (total * out * in > DF_PAR_MIN)
      for (gsize e = 0; e < total * out; e++)
        {
          const float *xr = x->data + (e / out) * in;
          const float *wr = w->data + (e % out) * in;
          float sum = 0.0f;

          for (int k = 0; k < in; k++)
            sum += xr[k] * wr[k];
          y->data[e] = b != NULL ? sum + b->data[e % out] : sum;
        }
    }

  if (df_graph_wants (g, x, w, b, NULL))
    {
      DfRecord *r = df_graph_push (g, linear_backward, y);

      r->in[0] = x;
      r->in[1] = w;
      r->in[2] = b;
    }
  return y;
}

/* ---- attention ---- */

/* p [rows,Lk] = softmax (scale q_h k_h^T) for query rows [i0, i0+rows) of
 * sample s, head h.  Forward and backward call it on the same tiles, so
 * they see the same probabilities. */
DF_HOT static void
attention_probs (const DfTensor *q, const DfTensor *k, int s, int h, int dh,
                 float scale, int i0, int rows, float *p)
{
  int lq = q->shape[1], lk = k->shape[1], d = q->shape[2];
  const float *qh = q->data + ((gsize) s * lq + i0) * d + h * dh;
  const float *kh = k->data + (gsize) s * lk * d + h * dh;

  df_sgemm (DF_NO_TRANS, DF_TRANS, rows, lk, dh, scale, qh, d, kh, d, 0.0f, p,
            lk);
  /* Softmax per row; the max and the sum over SUM_LANES interleaved
   * lanes (combined in a fixed order), which vectorise. */
  for (int i = 0; i < rows; i++)
    {
      float *restrict row = p + (gsize) i * lk;
      float mx[SUM_LANES], acc[SUM_LANES] = { 0 }, m, sum, inv;
      int j;

      for (int l = 0; l < SUM_LANES; l++)
        mx[l] = row[0];
      for (j = 0; j + SUM_LANES <= lk; j += SUM_LANES)
        for (int l = 0; l < SUM_LANES; l++)
          mx[l] = row[j + l] > mx[l] ? row[j + l] : mx[l];
      for (; j < lk; j++)
        mx[0] = row[j] > mx[0] ? row[j] : mx[0];
      m = mx[0];
      for (int l = 1; l < SUM_LANES; l++)
        m = mx[l] > m ? mx[l] : m;

      for (j = 0; j < lk; j++)
        row[j] = df_expf (row[j] - m);
      for (j = 0; j + SUM_LANES <= lk; j += SUM_LANES)
        for (int l = 0; l < SUM_LANES; l++)
          acc[l] += row[j + l];
      for (; j < lk; j++)
        acc[j % SUM_LANES] += row[j];
      sum = ((acc[0] + acc[1]) + (acc[2] + acc[3]))
            + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      inv = 1.0f / sum;
      for (j = 0; j < lk; j++)
        row[j] *= inv;
    }
}

/* A unit is (sample, head); it recomputes its probabilities instead of
 * keeping N*heads L x L matrices from the forward pass. */
DF_HOT static void
attention_backward (DfGraph *g, DfRecord *r)
{
  DfTensor *q = r->in[0], *k = r->in[1], *v = r->in[2];
  float *dq = df_grad_or_null (q), *dk = df_grad_or_null (k);
  float *dv = df_grad_or_null (v);
  const float *dout = r->out->grad;              /* [N,Lq,D] */
  int n = q->shape[0], lq = q->shape[1], lk = k->shape[1], d = q->shape[2];
  int heads = r->iarg[0], dh = d / heads;
  float scale = r->farg[0];
  gsize per_thread = 2 * (gsize) lq * lk;
  float *work;

  blas_serial ();
  work = df_graph_workspace (g, per_thread * omp_get_max_threads ());

#pragma omp parallel for schedule(static)
  for (int u = 0; u < n * heads; u++)
    {
      int s = u / heads, h = u % heads;
      gsize oq = (gsize) s * lq * d + h * dh, ok = (gsize) s * lk * d + h * dh;
      float *p = work + per_thread * omp_get_thread_num ();   /* [Lq,Lk] */
      float *dp = p + (gsize) lq * lk;                        /* [Lq,Lk] */

      for (int i0 = 0; i0 < lq; i0 += ROW_TILE)
        attention_probs (q, k, s, h, dh, scale, i0, MIN (ROW_TILE, lq - i0),
                         p + (gsize) i0 * lk);

      /* dV += P^T dO */
      if (dv != NULL)
        df_sgemm (DF_TRANS, DF_NO_TRANS, lk, dh, lq, 1.0f, p, lk, dout + oq, d,
                  1.0f, dv + ok, d);
      if (dq == NULL && dk == NULL)
        continue;

      /* dP = dO V^T; dS = P (dP - rowsum (dP P)) */
      df_sgemm (DF_NO_TRANS, DF_TRANS, lq, lk, dh, 1.0f, dout + oq, d,
                v->data + ok, d, 0.0f, dp, lk);
      for (int i = 0; i < lq; i++)
        {
          float *pr = p + (gsize) i * lk, *dr = dp + (gsize) i * lk;
          float dot = 0.0f;

          for (int j = 0; j < lk; j++)
            dot += pr[j] * dr[j];
          for (int j = 0; j < lk; j++)
            dr[j] = pr[j] * (dr[j] - dot);
        }

      /* dQ += scale dS K, dK += scale dS^T Q */
      if (dq != NULL)
        df_sgemm (DF_NO_TRANS, DF_NO_TRANS, lq, dh, lk, scale, dp, lk,
                  k->data + ok, d, 1.0f, dq + oq, d);
      if (dk != NULL)
        df_sgemm (DF_TRANS, DF_NO_TRANS, lk, dh, lq, scale, dp, lk,
                  q->data + oq, d, 1.0f, dk + ok, d);
    }
}

DF_HOT DfTensor *
df_attention (DfGraph *g, DfTensor *q, DfTensor *k, DfTensor *v, int heads)
{
  DfTensor *y;
  int n, lq, lk, d, dh, n_qt;
  gsize per_thread;
  float scale, *work;

  g_return_val_if_fail (g != NULL && q != NULL && k != NULL && v != NULL,
                        NULL);
  g_return_val_if_fail (q->ndim == 3 && df_tensor_same_shape (k, v), NULL);
  g_return_val_if_fail (k->ndim == 3 && k->shape[0] == q->shape[0]
                        && k->shape[2] == q->shape[2], NULL);
  g_return_val_if_fail (heads >= 1 && q->shape[2] % heads == 0, NULL);

  blas_serial ();
  n = q->shape[0];
  lq = q->shape[1];
  lk = k->shape[1];
  d = q->shape[2];
  dh = d / heads;
  scale = (float) (1.0 / sqrt (dh));
  n_qt = (lq + ROW_TILE - 1) / ROW_TILE;
  y = df_graph_tensor (g, 3, q->shape);
  per_thread = (gsize) ROW_TILE * lk;
  work = df_graph_workspace (g, per_thread * omp_get_max_threads ());

  /* A unit is (sample, head, tile of query rows): y_h [T,dh] =
   * softmax (scale q_h k_h^T) v_h; heads are dh-wide column blocks of D, as
   * PyTorch's view (N, L, heads, dh). */
#pragma omp parallel for schedule(static)
  for (int u = 0; u < n * heads * n_qt; u++)
    {
      int s = u / (heads * n_qt), h = (u / n_qt) % heads;
      int i0 = (u % n_qt) * ROW_TILE, rows = MIN (ROW_TILE, lq - i0);
      float *p = work + per_thread * omp_get_thread_num ();   /* [T,Lk] */

      attention_probs (q, k, s, h, dh, scale, i0, rows, p);
      df_sgemm (DF_NO_TRANS, DF_NO_TRANS, rows, dh, lk, 1.0f, p, lk,
                v->data + (gsize) s * lk * d + h * dh, d, 0.0f,
                y->data + ((gsize) s * lq + i0) * d + h * dh, d);
    }

  if (df_graph_wants (g, q, k, v, NULL))
    {
      DfRecord *r = df_graph_push (g, attention_backward, y);

      r->in[0] = q;
      r->in[1] = k;
      r->in[2] = v;
      r->iarg[0] = heads;
      r->farg[0] = scale;
    }
  return y;
}

/* ---- embedding ---- */

DF_HOT static void
embedding_backward (DfGraph *g, DfRecord *r)
{
  const int *ids = r->saved;
  float *dt = df_tensor_grad (r->in[0]);
  const float *dy = r->out->grad;
  int n = r->iarg[0], d = r->in[0]->shape[1];

  /* Rows may repeat: columns are split across threads, ids run in order. */
#pragma omp parallel for schedule(static) if ((gsize) n * d > DF_PAR_MIN)
  for (int j = 0; j < d; j++)
    for (int i = 0; i < n; i++)
      dt[(gsize) ids[i] * d + j] += dy[(gsize) i * d + j];
}

DF_HOT DfTensor *
df_embedding (DfGraph *g, DfTensor *table, const int *ids, int n)
{
  DfTensor *y;
  int shape[2];

  g_return_val_if_fail (g != NULL && table != NULL && ids != NULL, NULL);
  g_return_val_if_fail (table->ndim == 2 && n >= 1, NULL);
  for (int i = 0; i < n; i++)
    g_return_val_if_fail (ids[i] >= 0 && ids[i] < table->shape[0], NULL);

  shape[0] = n;
  shape[1] = table->shape[1];
  y = df_graph_tensor (g, 2, shape);
  for (int i = 0; i < n; i++)
    memcpy (y->data + (gsize) i * shape[1],
            table->data + (gsize) ids[i] * shape[1],
            shape[1] * sizeof (float));

  if (df_graph_wants (g, table, NULL, NULL, NULL))
    {
      DfRecord *r = df_graph_push (g, embedding_backward, y);
      int *saved = df_graph_saved (g, n * sizeof (int));

      memcpy (saved, ids, n * sizeof (int));
      r->in[0] = table;
      r->iarg[0] = n;
      r->saved = saved;
    }
  return y;
}

/* ---- mean over H, W ---- */

DF_HOT static void
mean_hw_backward (DfGraph *g, DfRecord *r)
{
  DfTensor *x = r->in[0];
  float *dx = df_tensor_grad (x);
  const float *dy = r->out->grad;                /* [N,C] */
  int nc = x->shape[0] * x->shape[1];
  gsize s = x->size / nc;
  float inv = 1.0f / s;

#pragma omp parallel for schedule(static) if (x->size > DF_PAR_MIN)
  for (int i = 0; i < nc; i++)
    for (gsize q = 0; q < s; q++)
      dx[i * s + q] += dy[i] * inv;
}

DF_HOT DfTensor *
df_mean_hw (DfGraph *g, DfTensor *x)
{
  DfTensor *y;
  int nc;
  gsize s;

  g_return_val_if_fail (g != NULL && x != NULL && x->ndim == 4, NULL);

  nc = x->shape[0] * x->shape[1];
  s = x->size / nc;
  y = df_graph_tensor (g, 2, x->shape);
#pragma omp parallel for schedule(static) if (x->size > DF_PAR_MIN)
  for (int i = 0; i < nc; i++)
    {
      double sum = 0;

      for (gsize q = 0; q < s; q++)
        sum += x->data[i * s + q];
      y->data[i] = (float) (sum / s);
    }

  if (df_graph_wants (g, x, NULL, NULL, NULL))
    {
      DfRecord *r = df_graph_push (g, mean_hw_backward, y);

      r->in[0] = x;
    }
  return y;
}

/* ---- nearest upsampling x2 ---- */

DF_HOT static void
upsample2x_backward (DfGraph *g, DfRecord *r)
{
  DfTensor *x = r->in[0];
  gboolean fresh;
  float *dx = df_tensor_grad_fresh (x, &fresh);
  const float *dy = r->out->grad;                /* [N,C,2H,2W] */
  int nc = x->shape[0] * x->shape[1], h = x->shape[2], w = x->shape[3];

#pragma omp parallel for schedule(static) if (x->size > DF_PAR_MIN)
  for (int i = 0; i < nc; i++)
    for (int yy = 0; yy < h; yy++)
      {
        const float *r0 = dy + ((gsize) i * 2 * h + 2 * yy) * 2 * w;
        const float *r1 = r0 + 2 * w;
        float *d = dx + ((gsize) i * h + yy) * w;

        if (fresh)
          for (int xx = 0; xx < w; xx++)
            d[xx] = (r0[2 * xx] + r0[2 * xx + 1])
                    + (r1[2 * xx] + r1[2 * xx + 1]);
        else
          for (int xx = 0; xx < w; xx++)
            d[xx] += (r0[2 * xx] + r0[2 * xx + 1])
                     + (r1[2 * xx] + r1[2 * xx + 1]);
      }
}

DF_HOT DfTensor *
df_upsample2x (DfGraph *g, DfTensor *x)
{
  DfTensor *y;
  int nc, h, w;

  g_return_val_if_fail (g != NULL && x != NULL && x->ndim == 4, NULL);

  nc = x->shape[0] * x->shape[1];
  h = x->shape[2];
  w = x->shape[3];
  y = df_graph_tensor_4d (g, x->shape[0], x->shape[1], 2 * h, 2 * w);
#pragma omp parallel for schedule(static) if (y->size > DF_PAR_MIN)
  for (int i = 0; i < nc; i++)
    for (int yy = 0; yy < h; yy++)
      {
        const float *src = x->data + ((gsize) i * h + yy) * w;
        float *r0 = y->data + ((gsize) i * 2 * h + 2 * yy) * 2 * w;

        for (int xx = 0; xx < w; xx++)
          r0[2 * xx] = r0[2 * xx + 1] = src[xx];
        memcpy (r0 + 2 * w, r0, 2 * w * sizeof (float));
      }

  if (df_graph_wants (g, x, NULL, NULL, NULL))
    {
      DfRecord *r = df_graph_push (g, upsample2x_backward, y);

      r->in[0] = x;
    }
  return y;
}

/* ---- concatenation over channels ---- */

DF_HOT static void
concat_backward (DfGraph *g, DfRecord *r)
{
  DfTensor *a = r->in[0], *b = r->in[1];
  const float *dy = r->out->grad;
  int n = a->shape[0];
  gsize sa = a->size / n, sb = b->size / n;

  /* One input after the other, in case they are the same tensor. */
  for (int k = 0; k < 2; k++)
    {
      gboolean fresh;
      float *d = df_grad_fresh_or_null (r->in[k], &fresh);
      gsize sk = k == 0 ? sa : sb, off = k == 0 ? 0 : sa;

      if (d == NULL)
        continue;
#pragma omp parallel for schedule(static) if (r->out->size > DF_PAR_MIN)
      for (int s = 0; s < n; s++)
        {
          const float *src = dy + s * (sa + sb) + off;
          float *dst = d + s * sk;

          if (fresh)
            memcpy (dst, src, sk * sizeof (float));
          else
            for (gsize i = 0; i < sk; i++)
              dst[i] += src[i];
        }
    }
}

DF_HOT DfTensor *
df_concat (DfGraph *g, DfTensor *a, DfTensor *b)
{
  DfTensor *y;
  int n;
  gsize sa, sb;

  g_return_val_if_fail (g != NULL && a != NULL && b != NULL, NULL);
  g_return_val_if_fail (a->ndim == 4 && b->ndim == 4, NULL);
  g_return_val_if_fail (a->shape[0] == b->shape[0] && a->shape[2] == b->shape[2]
                        && a->shape[3] == b->shape[3], NULL);

  n = a->shape[0];
  sa = a->size / n;
  sb = b->size / n;
  y = df_graph_tensor_4d (g, n, a->shape[1] + b->shape[1], a->shape[2],
                          a->shape[3]);
  for (int s = 0; s < n; s++)
    {
      memcpy (y->data + s * (sa + sb), a->data + s * sa, sa * sizeof (float));
      memcpy (y->data + s * (sa + sb) + sa, b->data + s * sb,
              sb * sizeof (float));
    }

  if (df_graph_wants (g, a, b, NULL, NULL))
    {
      DfRecord *r = df_graph_push (g, concat_backward, y);

      r->in[0] = a;
      r->in[1] = b;
    }
  return y;
}

/* ---- image <-> tokens ---- */

/* dst [N,B,A] (+)= src [N,A,B] transposed per sample. */
DF_HOT static void
transpose_batch (const float *src, float *dst, int n, int a, int b,
                 gboolean add)
{
  gsize per = (gsize) a * b;

#pragma omp parallel for collapse(2) schedule(static) if (n * per > DF_PAR_MIN)
  for (int s = 0; s < n; s++)
    for (int j = 0; j < b; j++)
      {
        const float *sp = src + s * per + j;
        float *dp = dst + s * per + (gsize) j * a;

        if (add)
          for (int i = 0; i < a; i++)
            dp[i] += sp[(gsize) i * b];
        else
          for (int i = 0; i < a; i++)
            dp[i] = sp[(gsize) i * b];
      }
}

static void
to_tokens_backward (DfGraph *g, DfRecord *r)
{
  DfTensor *x = r->in[0];                        /* [N,C,L] */
  int n = x->shape[0], c = x->shape[1];
  int l = x->size / ((gsize) n * c);

  gboolean fresh;
  float *dx = df_tensor_grad_fresh (x, &fresh);

  transpose_batch (r->out->grad, dx, n, l, c, !fresh);
}

DfTensor *
df_to_tokens (DfGraph *g, DfTensor *x)
{
  DfTensor *y;
  int n, c, l, shape[3];

  g_return_val_if_fail (g != NULL && x != NULL && x->ndim == 4, NULL);

  n = x->shape[0];
  c = x->shape[1];
  l = x->shape[2] * x->shape[3];
  shape[0] = n;
  shape[1] = l;
  shape[2] = c;
  y = df_graph_tensor (g, 3, shape);
  transpose_batch (x->data, y->data, n, c, l, FALSE);

  if (df_graph_wants (g, x, NULL, NULL, NULL))
    {
      DfRecord *r = df_graph_push (g, to_tokens_backward, y);

      r->in[0] = x;
    }
  return y;
}

static void
from_tokens_backward (DfGraph *g, DfRecord *r)
{
  DfTensor *x = r->in[0];                        /* [N,L,C] */
  gboolean fresh;
  float *dx = df_tensor_grad_fresh (x, &fresh);

  transpose_batch (r->out->grad, dx, x->shape[0], x->shape[2], x->shape[1],
                   !fresh);
}

DfTensor *
df_from_tokens (DfGraph *g, DfTensor *x, int h, int w)
{
  DfTensor *y;
  int n, l, c;

  g_return_val_if_fail (g != NULL && x != NULL && x->ndim == 3, NULL);
  g_return_val_if_fail (h >= 1 && w >= 1 && x->shape[1] == h * w, NULL);

  n = x->shape[0];
  l = x->shape[1];
  c = x->shape[2];
  y = df_graph_tensor_4d (g, n, c, h, w);
  transpose_batch (x->data, y->data, n, l, c, FALSE);

  if (df_graph_wants (g, x, NULL, NULL, NULL))
    {
      DfRecord *r = df_graph_push (g, from_tokens_backward, y);

      r->in[0] = x;
    }
  return y;
}
