/* tensor.c: tensors, the recording graph, backward, elementwise operations
 * and losses (see tensor.h).
 *
 * Legend: N batch, C channels, H height, W width, K classes.
 *
 * A graph hands out tensors from numbered slots: the i-th tensor asked for
 * since the last reset is slot i, which keeps its buffers, so a pass that
 * makes the same tensors in the same order allocates nothing.  Saved
 * buffers of recorded operations are recycled the same way.
 */
#include "tensor-private.h"

#include <math.h>
#include <string.h>

#define DF_ALIGN 64

struct _DfGraph {
  gboolean   record;
  GPtrArray *tensors;        /* DfTensor *, one a slot */
  guint      n_tensors;      /* slots in use this pass */
  GArray    *records;        /* DfRecord */
  GPtrArray *saved;          /* SavedBuf *, one a slot */
  guint      n_saved;
  float     *work;           /* scratch, see df_graph_workspace */
  gsize      work_capacity;
};

typedef struct {
  void  *data;
  gsize  capacity;           /* bytes */
} SavedBuf;

static void *
aligned_alloc_floats (gsize n)
{
  return g_aligned_alloc (MAX (n, 1), sizeof (float), DF_ALIGN);
}

static gboolean
shape_ok (int ndim, const int *shape)
{
  if (ndim < 1 || ndim > DF_MAX_DIMS || shape == NULL)
    return FALSE;
  for (int i = 0; i < ndim; i++)
    if (shape[i] <= 0)
      return FALSE;
  return TRUE;
}

static void
set_shape (DfTensor *t, int ndim, const int *shape)
{
  t->ndim = ndim;
  t->size = 1;
  for (int i = 0; i < DF_MAX_DIMS; i++)
    {
      t->shape[i] = i < ndim ? shape[i] : 0;
      if (i < ndim)
        t->size *= (gsize) shape[i];
    }
}

/* ---- caller-owned tensors ---- */

DfTensor *
df_tensor_new (int ndim, const int *shape)
{
  DfTensor *t;

  g_return_val_if_fail (shape_ok (ndim, shape), NULL);

  t = g_new0 (DfTensor, 1);
  set_shape (t, ndim, shape);
  t->capacity = t->size;
  t->data = aligned_alloc_floats (t->size);
  memset (t->data, 0, t->size * sizeof (float));
  return t;
}

DfTensor *
df_tensor_new_4d (int n, int c, int h, int w)
{
  int shape[4] = { n, c, h, w };

  return df_tensor_new (4, shape);
}

DfTensor *
df_tensor_new_2d (int rows, int cols)
{
  int shape[2] = { rows, cols };

  return df_tensor_new (2, shape);
}

DfTensor *
df_tensor_new_1d (int n)
{
  return df_tensor_new (1, &n);
}

static void
tensor_release (DfTensor *t)
{
  g_aligned_free (t->data);
  g_aligned_free (t->grad);
  g_free (t);
}

void
df_tensor_free (DfTensor *t)
{
  if (t == NULL)
    return;
  g_return_if_fail (!t->owned_by_graph);
  tensor_release (t);
}

static void
grad_reserve (DfTensor *t)
{
  if (t->grad != NULL && t->grad_capacity >= t->size)
    return;
  g_aligned_free (t->grad);
  t->grad = aligned_alloc_floats (t->size);
  t->grad_capacity = t->size;
}

void
df_tensor_require_grad (DfTensor *t)
{
  g_return_if_fail (t != NULL);

  grad_reserve (t);
  memset (t->grad, 0, t->size * sizeof (float));
  t->requires_grad = TRUE;
  t->grad_valid = TRUE;
}

float *
df_tensor_grad (DfTensor *t)
{
  g_return_val_if_fail (t != NULL, NULL);

  if (!t->grad_valid)
    {
      grad_reserve (t);
      memset (t->grad, 0, t->size * sizeof (float));
      t->grad_valid = TRUE;
    }
  return t->grad;
}

void
df_copy_floats (float *dst, const float *src, gsize n)
{
  gsize blocks = (n + DF_PAR_MIN - 1) / DF_PAR_MIN;

#pragma omp parallel for schedule(static) if (blocks > 1)
  for (gsize k = 0; k < blocks; k++)
    memcpy (dst + k * DF_PAR_MIN, src + k * DF_PAR_MIN,
            MIN (DF_PAR_MIN, n - k * DF_PAR_MIN) * sizeof (float));
}

float *
df_tensor_grad_fresh (DfTensor *t, gboolean *fresh)
{
  g_return_val_if_fail (t != NULL && fresh != NULL, NULL);

  *fresh = !t->grad_valid;
  if (!t->grad_valid)
    {
      grad_reserve (t);
      t->grad_valid = TRUE;
    }
  return t->grad;
}

DF_HOT void
df_grad_accumulate (DfTensor *t, const float *g)
{
  gboolean fresh;
  float *d = df_tensor_grad_fresh (t, &fresh);

  if (fresh)
    df_copy_floats (d, g, t->size);
  else
#pragma omp parallel for schedule(static) if (t->size > DF_PAR_MIN)
    for (gsize i = 0; i < t->size; i++)
      d[i] += g[i];
}

void
df_tensor_zero_grad (DfTensor *t)
{
  g_return_if_fail (t != NULL);

  if (t->grad != NULL)
    memset (t->grad, 0, t->size * sizeof (float));
}

gboolean
df_tensor_same_shape (const DfTensor *a, const DfTensor *b)
{
  g_return_val_if_fail (a != NULL && b != NULL, FALSE);

  if (a->ndim != b->ndim)
    return FALSE;
  for (int i = 0; i < a->ndim; i++)
    if (a->shape[i] != b->shape[i])
      return FALSE;
  return TRUE;
}

/* ---- the graph ---- */

DfGraph *
df_graph_new (gboolean record)
{
  DfGraph *g = g_new0 (DfGraph, 1);

  g->record = record;
  g->tensors = g_ptr_array_new ();
  g->records = g_array_new (FALSE, FALSE, sizeof (DfRecord));
  g->saved = g_ptr_array_new ();
  return g;
}

void
df_graph_free (DfGraph *g)
{
  if (g == NULL)
    return;
  for (guint i = 0; i < g->tensors->len; i++)
    tensor_release (g_ptr_array_index (g->tensors, i));
  for (guint i = 0; i < g->saved->len; i++)
    {
      SavedBuf *s = g_ptr_array_index (g->saved, i);

      g_aligned_free (s->data);
      g_free (s);
    }
  g_ptr_array_free (g->tensors, TRUE);
  g_ptr_array_free (g->saved, TRUE);
  g_array_free (g->records, TRUE);
  g_aligned_free (g->work);
  g_free (g);
}

void
df_graph_reset (DfGraph *g)
{
  g_return_if_fail (g != NULL);

  g->n_tensors = 0;
  g->n_saved = 0;
  g_array_set_size (g->records, 0);
}

gboolean
df_graph_is_recording (DfGraph *g)
{
  g_return_val_if_fail (g != NULL, FALSE);
  return g->record;
}

DfTensor *
df_graph_tensor (DfGraph *g, int ndim, const int *shape)
{
  DfTensor *t;

  g_return_val_if_fail (g != NULL, NULL);
  g_return_val_if_fail (shape_ok (ndim, shape), NULL);

  /* Take the next slot, growing its buffer only if this pass needs more. */
  if (g->n_tensors == g->tensors->len)
    {
      t = g_new0 (DfTensor, 1);
      t->owned_by_graph = TRUE;
      g_ptr_array_add (g->tensors, t);
    }
  t = g_ptr_array_index (g->tensors, g->n_tensors++);
  set_shape (t, ndim, shape);
  if (t->data == NULL || t->capacity < t->size)
    {
      g_aligned_free (t->data);
      t->data = aligned_alloc_floats (t->size);
      t->capacity = t->size;
    }
  t->requires_grad = FALSE;
  t->grad_valid = FALSE;
  return t;
}

DfTensor *
df_graph_tensor_4d (DfGraph *g, int n, int c, int h, int w)
{
  int shape[4] = { n, c, h, w };

  return df_graph_tensor (g, 4, shape);
}

gboolean
df_graph_wants (DfGraph *g, DfTensor *a, DfTensor *b, DfTensor *c,
                DfTensor *d)
{
  return g->record
         && ((a != NULL && a->requires_grad) || (b != NULL && b->requires_grad)
             || (c != NULL && c->requires_grad)
             || (d != NULL && d->requires_grad));
}

DfRecord *
df_graph_push (DfGraph *g, DfBackwardFunc backward, DfTensor *out)
{
  DfRecord r = { 0 };

  r.backward = backward;
  r.out = out;
  out->requires_grad = TRUE;
  g_array_append_val (g->records, r);
  return &g_array_index (g->records, DfRecord, g->records->len - 1);
}

void *
df_graph_saved (DfGraph *g, gsize bytes)
{
  SavedBuf *s;

  if (g->n_saved == g->saved->len)
    g_ptr_array_add (g->saved, g_new0 (SavedBuf, 1));
  s = g_ptr_array_index (g->saved, g->n_saved++);
  if (s->data == NULL || s->capacity < bytes)
    {
      g_aligned_free (s->data);
      s->data = g_aligned_alloc (MAX (bytes, 1), 1, DF_ALIGN);
      s->capacity = bytes;
    }
  return s->data;
}

float *
df_graph_workspace (DfGraph *g, gsize n_floats)
{
  if (g->work == NULL || g->work_capacity < n_floats)
    {
      g_aligned_free (g->work);
      g->work = aligned_alloc_floats (n_floats);
      g->work_capacity = n_floats;
    }
  return g->work;
}

void
df_graph_backward (DfGraph *g)
{
  g_return_if_fail (g != NULL);

  for (guint i = g->records->len; i-- > 0;)
    {
      DfRecord *r = &g_array_index (g->records, DfRecord, i);

      /* Nothing flowed into this output: its inputs get nothing from it. */
      if (!r->out->grad_valid)
        continue;
      r->backward (g, r);
    }
}

/* ---- elementwise operations ---- */

DF_HOT static void
add_backward (DfGraph *g, DfRecord *r)
{
  /* One input after the other: df_add (x, x) adds into what the first
   * wrote. */
  for (int k = 0; k < 2; k++)
    if (r->in[k]->requires_grad)
      df_grad_accumulate (r->in[k], r->out->grad);
}

DF_HOT DfTensor *
df_add (DfGraph *g, DfTensor *a, DfTensor *b)
{
  DfTensor *y;

  g_return_val_if_fail (g != NULL && a != NULL && b != NULL, NULL);
  g_return_val_if_fail (df_tensor_same_shape (a, b), NULL);

  y = df_graph_tensor (g, a->ndim, a->shape);
#pragma omp parallel for schedule(static) if (a->size > DF_PAR_MIN)
  for (gsize i = 0; i < a->size; i++)
    y->data[i] = a->data[i] + b->data[i];

  if (df_graph_wants (g, a, b, NULL, NULL))
    {
      DfRecord *r = df_graph_push (g, add_backward, y);

      r->in[0] = a;
      r->in[1] = b;
    }
  return y;
}

DF_HOT static void
scale_backward (DfGraph *g, DfRecord *r)
{
  const float *dy = r->out->grad;
  gboolean fresh;
  float *dx = df_tensor_grad_fresh (r->in[0], &fresh);
  float s = r->farg[0];
  gsize n = r->out->size;

  if (fresh)
#pragma omp parallel for schedule(static) if (n > DF_PAR_MIN)
    for (gsize i = 0; i < n; i++)
      dx[i] = s * dy[i];
  else
#pragma omp parallel for schedule(static) if (n > DF_PAR_MIN)
    for (gsize i = 0; i < n; i++)
      dx[i] += s * dy[i];
}

DF_HOT DfTensor *
df_scale (DfGraph *g, DfTensor *x, float s)
{
  DfTensor *y;

  g_return_val_if_fail (g != NULL && x != NULL, NULL);

  y = df_graph_tensor (g, x->ndim, x->shape);
#pragma omp parallel for schedule(static) if (x->size > DF_PAR_MIN)
  for (gsize i = 0; i < x->size; i++)
    y->data[i] = s * x->data[i];

  if (df_graph_wants (g, x, NULL, NULL, NULL))
    {
      DfRecord *r = df_graph_push (g, scale_backward, y);

      r->in[0] = x;
      r->farg[0] = s;
    }
  return y;
}

DF_HOT static void
add_channel_backward (DfGraph *g, DfRecord *r)
{
  const float *dy = r->out->grad;            /* [N,C,S] */
  float *de;                                 /* [N,C] */
  int nc = r->in[1]->shape[0] * r->in[1]->shape[1];
  gsize s = r->out->size / nc;

  if (r->in[0]->requires_grad)
    df_grad_accumulate (r->in[0], dy);
  de = df_grad_or_null (r->in[1]);
  if (de != NULL)
    {
#pragma omp parallel for schedule(static) if (r->out->size > DF_PAR_MIN)
      for (int i = 0; i < nc; i++)
        de[i] += (float) df_sum_f (dy + i * s, s);
    }
}

DF_HOT DfTensor *
df_add_channel (DfGraph *g, DfTensor *x, DfTensor *e)
{
  DfTensor *y;
  int nc;
  gsize s;

  g_return_val_if_fail (g != NULL && x != NULL && e != NULL, NULL);
  g_return_val_if_fail (x->ndim >= 2 && e->ndim == 2, NULL);
  g_return_val_if_fail (e->shape[0] == x->shape[0]
                        && e->shape[1] == x->shape[1], NULL);

  nc = x->shape[0] * x->shape[1];
  s = x->size / nc;
  y = df_graph_tensor (g, x->ndim, x->shape);
#pragma omp parallel for schedule(static) if (x->size > DF_PAR_MIN)
  for (int i = 0; i < nc; i++)
    for (gsize j = 0; j < s; j++)
      y->data[i * s + j] = x->data[i * s + j] + e->data[i];

  if (df_graph_wants (g, x, e, NULL, NULL))
    {
      DfRecord *r = df_graph_push (g, add_channel_backward, y);

      r->in[0] = x;
      r->in[1] = e;
    }
  return y;
}

DF_HOT static void
silu_backward (DfGraph *g, DfRecord *r)
{
  const float *x = r->in[0]->data;
  const float *dy = r->out->grad;
  float *dx = df_tensor_grad (r->in[0]);
  gsize n = r->out->size;

#pragma omp parallel for schedule(static) if (n > DF_PAR_MIN)
  for (gsize i = 0; i < n; i++)
    dx[i] += dy[i] * df_silu_slope (x[i]);
}

DF_HOT DfTensor *
df_silu (DfGraph *g, DfTensor *x)
{
  DfTensor *y;

  g_return_val_if_fail (g != NULL && x != NULL, NULL);

  y = df_graph_tensor (g, x->ndim, x->shape);
#pragma omp parallel for schedule(static) if (x->size > DF_PAR_MIN)
  for (gsize i = 0; i < x->size; i++)
    y->data[i] = df_silu_of (x->data[i]);

  if (df_graph_wants (g, x, NULL, NULL, NULL))
    {
      DfRecord *r = df_graph_push (g, silu_backward, y);

      r->in[0] = x;
    }
  return y;
}

/* ---- losses ---- */

DF_HOT double
df_loss_mse (DfGraph *g, DfTensor *pred, const float *target)
{
  double sum = 0;
  gsize n;

  g_return_val_if_fail (g != NULL && pred != NULL && target != NULL, 0);

  n = pred->size;
  for (gsize i = 0; i < n; i++)
    {
      double d = (double) pred->data[i] - target[i];

      sum += d * d;
    }

  if (df_graph_wants (g, pred, NULL, NULL, NULL))
    {
      float *dp = df_tensor_grad (pred);
      float k = (float) (2.0 / n);

#pragma omp parallel for schedule(static) if (n > DF_PAR_MIN)
      for (gsize i = 0; i < n; i++)
        dp[i] += k * (pred->data[i] - target[i]);
    }
  return sum / n;
}

/* Row n of logits [N,K]: fills p[K] with softmax and returns log p[label]. */
static double
softmax_row (const float *z, int k, int label, float *p)
{
  double m = z[0], sum = 0;

  for (int j = 1; j < k; j++)
    m = MAX (m, z[j]);
  for (int j = 0; j < k; j++)
    sum += exp (z[j] - m);
  for (int j = 0; j < k; j++)
    p[j] = (float) (exp (z[j] - m) / sum);
  return z[label] - m - log (sum);
}

/* sum over n of log p[label], and if wanted grad += sign * (onehot - p) *
 * weight, so the mean loss and the ascent seed share this code. */
static double
log_prob_common (DfGraph *g, DfTensor *logits, const int *labels,
                 float weight)
{
  int n = logits->shape[0], k = logits->shape[1];
  float *dz = NULL;
  float *p = df_graph_workspace (g, k);          /* [K] */
  double total = 0;

  if (df_graph_wants (g, logits, NULL, NULL, NULL))
    dz = df_tensor_grad (logits);

  for (int i = 0; i < n; i++)
    {
      const float *z = logits->data + (gsize) i * k;

      total += softmax_row (z, k, labels[i], p);
      if (dz != NULL)
        for (int j = 0; j < k; j++)
          dz[(gsize) i * k + j] += weight * ((j == labels[i]) - p[j]);
    }
  return total;
}

static gboolean
labels_ok (DfTensor *logits, const int *labels)
{
  if (logits->ndim != 2 || labels == NULL)
    return FALSE;
  for (int i = 0; i < logits->shape[0]; i++)
    if (labels[i] < 0 || labels[i] >= logits->shape[1])
      return FALSE;
  return TRUE;
}

double
df_loss_cross_entropy (DfGraph *g, DfTensor *logits, const int *labels)
{
  int n;

  g_return_val_if_fail (g != NULL && logits != NULL, 0);
  g_return_val_if_fail (labels_ok (logits, labels), 0);

  n = logits->shape[0];
  return -log_prob_common (g, logits, labels, -1.0f / n) / n;
}

double
df_seed_log_prob (DfGraph *g, DfTensor *logits, const int *labels)
{
  g_return_val_if_fail (g != NULL && logits != NULL, 0);
  g_return_val_if_fail (labels_ok (logits, labels), 0);

  return log_prob_common (g, logits, labels, 1.0f);
}
