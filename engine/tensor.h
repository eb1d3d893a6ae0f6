/* tensor.h: float32 tensors, a graph that records operations, and the
 * operations the UNet and the classifier are made of, forward and backward.
 *
 * Legend: N batch, C channels, H height, W width, L tokens (H*W), D features.
 * Tensors are contiguous, row-major, NCHW for images.
 *
 * Every operation takes a DfGraph.  The graph owns the tensors the operation
 * returns and reuses their memory after df_graph_reset(), so a sampler that
 * runs the same forward pass again allocates nothing.  When the graph records
 * (df_graph_new (TRUE)), each operation whose inputs need a gradient keeps
 * what its backward needs, and df_graph_backward() runs them in reverse,
 * adding into the grad of every tensor that has requires_grad.
 *
 * Parameters are tensors made with df_tensor_new() (owned by a model, not a
 * graph); give them a gradient with df_tensor_require_grad().
 */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

#define DF_MAX_DIMS 4

typedef struct _DfTensor DfTensor;
typedef struct _DfGraph  DfGraph;

struct _DfTensor {
  float    *data;
  float    *grad;            /* NULL until needed; same size as data */
  int       ndim;
  int       shape[DF_MAX_DIMS];
  gsize     size;            /* number of elements */
  gboolean  requires_grad;
  /* private */
  gboolean  owned_by_graph;
  gsize     capacity;
  gsize     grad_capacity;
  gboolean  grad_valid;      /* grad holds this pass's values */
};

/* A tensor owned by the caller, zero-filled.  Unused trailing dims are 0. */
DfTensor  *df_tensor_new           (int ndim, const int *shape);
DfTensor  *df_tensor_new_4d        (int n, int c, int h, int w);
DfTensor  *df_tensor_new_2d        (int rows, int cols);
DfTensor  *df_tensor_new_1d        (int n);
void       df_tensor_free          (DfTensor *t);
/* Allocate (zeroed) t->grad and mark t as needing it. */
void       df_tensor_require_grad  (DfTensor *t);
/* t->grad, zeroed if this is its first use since the last reset. */
float     *df_tensor_grad          (DfTensor *t);
void       df_tensor_zero_grad     (DfTensor *t);
gboolean   df_tensor_same_shape    (const DfTensor *a, const DfTensor *b);

DfGraph   *df_graph_new            (gboolean record);
void       df_graph_free           (DfGraph *g);
/* Forget recorded operations and recycle the tensors made since the last
 * reset; tensors obtained before become invalid. */
void       df_graph_reset          (DfGraph *g);
gboolean   df_graph_is_recording   (DfGraph *g);
/* A graph-owned tensor (uninitialised data): inputs of a forward pass. */
DfTensor  *df_graph_tensor         (DfGraph *g, int ndim, const int *shape);
DfTensor  *df_graph_tensor_4d      (DfGraph *g, int n, int c, int h, int w);
/* Run recorded backward steps in reverse.  Seed the output's grad first
 * (the loss functions below do). */
void       df_graph_backward       (DfGraph *g);

/* ---- operations (y is graph-owned) ---- */

/* x [N,Ci,H,W], w [Co,Ci,k,k], b [Co] or NULL -> y [N,Co,Ho,Wo].
 * pad_lo pads top and left, pad_hi bottom and right (diffusers pads (0,1)
 * for downsample_padding 0); Ho = (H + pad_lo + pad_hi - k) / stride + 1. */
DfTensor  *df_conv2d        (DfGraph *g, DfTensor *x, DfTensor *w, DfTensor *b,
                             int stride, int pad_lo, int pad_hi);
/* df_add_channel (g, df_conv2d (g, x, w, b, ...), e) in one op: e [N,Co]
 * added to every position of its sample's channel, after the bias (the
 * same values), without the convolution's own output in memory. */
DfTensor  *df_conv2d_emb    (DfGraph *g, DfTensor *x, DfTensor *w, DfTensor *b,
                             DfTensor *e, int stride, int pad_lo, int pad_hi);
/* df_add (g, res, df_conv2d (g, x, w, b, ...)) in one op: res has the
 * output's shape (the same values, without the convolution's own output
 * in memory). */
DfTensor  *df_conv2d_add    (DfGraph *g, DfTensor *x, DfTensor *w, DfTensor *b,
                             DfTensor *res, int stride, int pad_lo,
                             int pad_hi);
/* x [N,C,...] -> same; gamma, beta [C]. */
DfTensor  *df_group_norm    (DfGraph *g, DfTensor *x, DfTensor *gamma,
                             DfTensor *beta, int groups, float eps);
/* df_silu (g, df_group_norm (g, x, ...)) in one pass, forward and
 * backward, without the norm's output in memory: the same values. */
DfTensor  *df_group_norm_silu (DfGraph *g, DfTensor *x, DfTensor *gamma,
                               DfTensor *beta, int groups, float eps);
DfTensor  *df_silu          (DfGraph *g, DfTensor *x);
/* x [..., I], w [O, I], b [O] or NULL -> y [..., O]. */
DfTensor  *df_linear        (DfGraph *g, DfTensor *x, DfTensor *w, DfTensor *b);
DfTensor  *df_add           (DfGraph *g, DfTensor *a, DfTensor *b);
DfTensor  *df_scale         (DfGraph *g, DfTensor *x, float s);
/* x [N,C,H,W] + e [N,C] broadcast over H, W. */
DfTensor  *df_add_channel   (DfGraph *g, DfTensor *x, DfTensor *e);
/* a [N,Ca,H,W], b [N,Cb,H,W] -> [N,Ca+Cb,H,W]. */
DfTensor  *df_concat        (DfGraph *g, DfTensor *a, DfTensor *b);
/* Nearest neighbour x2: [N,C,H,W] -> [N,C,2H,2W]. */
DfTensor  *df_upsample2x    (DfGraph *g, DfTensor *x);
/* [N,C,H,W] <-> [N,L,C]. */
DfTensor  *df_to_tokens     (DfGraph *g, DfTensor *x);
DfTensor  *df_from_tokens   (DfGraph *g, DfTensor *x, int h, int w);
/* Scaled dot-product attention, heads over D: q, k, v [N,L,D] -> [N,L,D],
 * softmax(q k^T / sqrt(D / heads)) v per head. */
DfTensor  *df_attention     (DfGraph *g, DfTensor *q, DfTensor *k, DfTensor *v,
                             int heads);
/* table [V,D], ids[N] -> [N,D]. */
DfTensor  *df_embedding     (DfGraph *g, DfTensor *table, const int *ids, int n);
/* [N,C,H,W] -> [N,C]. */
DfTensor  *df_mean_hw       (DfGraph *g, DfTensor *x);

/* ---- losses: return the value and seed the input's grad ---- */

/* mean over all elements of (pred - target)^2. */
double     df_loss_mse            (DfGraph *g, DfTensor *pred, const float *target);
/* mean over N of -log softmax(logits[n])[labels[n]]; logits [N,K]. */
double     df_loss_cross_entropy  (DfGraph *g, DfTensor *logits, const int *labels);
/* sum over N of log softmax(logits[n])[labels[n]], grad seeded for ascent
 * (classifier guidance: grad of log p(y | x_t) with respect to x_t). */
double     df_seed_log_prob       (DfGraph *g, DfTensor *logits, const int *labels);

G_END_DECLS
