/* fid.c: Frechet distance by symmetric eigendecompositions, and classifier
 * features.
 *
 * Legend: N feature vectors, D features, K classes.  Matrices are row-major.
 */
#include "fid.h"

#include <math.h>
#include <string.h>

#include "tensor.h"
#include "unet.h"

/* Cyclic Jacobi: rotate away each off-diagonal element in turn until the
 * off-diagonal mass is negligible against the diagonal.  Quadratic
 * convergence makes ~10 sweeps enough for D <= 256 in double. */
void
df_sym_eigen (double *a, int d, double *evals, double *evecs)
{
  int *order;
  double *tmp;

  g_return_if_fail (a != NULL && evals != NULL && evecs != NULL && d > 0);

  for (int i = 0; i < d; i++)
    for (int j = 0; j < d; j++)
      evecs[i * d + j] = i == j;

  for (int sweep = 0; sweep < 100; sweep++)
    {
      double off = 0, diag = 0;

      for (int i = 0; i < d; i++)
        {
          diag += a[i * d + i] * a[i * d + i];
          for (int j = i + 1; j < d; j++)
            off += a[i * d + j] * a[i * d + j];
        }
      if (off <= 1e-24 * diag || off == 0)
        break;

      for (int p = 0; p < d - 1; p++)
        for (int q = p + 1; q < d; q++)
          {
            double apq = a[p * d + q], app, aqq, theta, t, c, s;

            if (apq == 0)
              continue;
            app = a[p * d + p];
            aqq = a[q * d + q];

            /* The rotation angle that zeroes a[p][q] (Golub & Van Loan
             * 8.4.2), the smaller root for stability. */
            theta = (aqq - app) / (2 * apq);
            t = (theta >= 0 ? 1 : -1)
                / (fabs (theta) + sqrt (theta * theta + 1));
            c = 1 / sqrt (t * t + 1);
            s = t * c;

            /* a <- J^T a J, on rows and columns p and q. */
            for (int k = 0; k < d; k++)
              {
                double akp = a[k * d + p], akq = a[k * d + q];
                a[k * d + p] = c * akp - s * akq;
                a[k * d + q] = s * akp + c * akq;
              }
            for (int k = 0; k < d; k++)
              {
                double apk = a[p * d + k], aqk = a[q * d + k];
                a[p * d + k] = c * apk - s * aqk;
                a[q * d + k] = s * apk + c * aqk;
              }
            a[p * d + q] = a[q * d + p] = 0;

            /* V <- V J. */
            for (int k = 0; k < d; k++)
              {
                double vkp = evecs[k * d + p], vkq = evecs[k * d + q];
                evecs[k * d + p] = c * vkp - s * vkq;
                evecs[k * d + q] = s * vkp + c * vkq;
              }
          }
    }

  /* Sort ascending, permuting the eigenvector columns with the values. */
  order = g_new (int, d);
  tmp = g_new (double, (gsize) d * d);
  for (int i = 0; i < d; i++)
    order[i] = i;
  for (int i = 1; i < d; i++)
    {
      int o = order[i], j = i;
      while (j > 0 && a[order[j - 1] * d + order[j - 1]] > a[o * d + o])
        {
          order[j] = order[j - 1];
          j--;
        }
      order[j] = o;
    }
  memcpy (tmp, evecs, sizeof (double) * d * d);
  for (int k = 0; k < d; k++)
    {
      evals[k] = a[order[k] * d + order[k]];
      for (int i = 0; i < d; i++)
        evecs[i * d + k] = tmp[i * d + order[k]];
    }
  g_free (tmp);
  g_free (order);
}

void
df_sym_sqrt (const double *a, int d, double *out)
{
  double *work = g_new (double, (gsize) d * d);   /* [D,D] */
  double *vecs = g_new (double, (gsize) d * d);   /* [D,D] */
  double *vals = g_new (double, d);               /* [D] */

  memcpy (work, a, sizeof (double) * d * d);
  df_sym_eigen (work, d, vals, vecs);
  for (int k = 0; k < d; k++)
    vals[k] = vals[k] > 0 ? sqrt (vals[k]) : 0;

  /* out = V diag(sqrt vals) V^T, symmetric by construction. */
  for (int i = 0; i < d; i++)
    for (int j = i; j < d; j++)
      {
        double sum = 0;
        for (int k = 0; k < d; k++)
          sum += vecs[i * d + k] * vals[k] * vecs[j * d + k];
        out[i * d + j] = out[j * d + i] = sum;
      }
  g_free (vals);
  g_free (vecs);
  g_free (work);
}

void
df_feature_stats (const float *f, gsize n, int d, double *mu, double *cov)
{
  double *centred;

  g_return_if_fail (f != NULL && n >= 2 && d > 0);

  /* Two passes (mean, then centred products) keep the covariance accurate
   * when the features sit far from zero. */
  memset (mu, 0, sizeof (double) * d);
  for (gsize i = 0; i < n; i++)
    for (int j = 0; j < d; j++)
      mu[j] += f[i * d + j];
  for (int j = 0; j < d; j++)
    mu[j] /= n;

  centred = g_new (double, d);    /* [D] */
  memset (cov, 0, sizeof (double) * d * d);
  for (gsize i = 0; i < n; i++)
    {
      for (int j = 0; j < d; j++)
        centred[j] = f[i * d + j] - mu[j];
      for (int j = 0; j < d; j++)
        for (int k = j; k < d; k++)
          cov[j * d + k] += centred[j] * centred[k];
    }
  for (int j = 0; j < d; j++)
    for (int k = j; k < d; k++)
      cov[k * d + j] = cov[j * d + k] /= (double) (n - 1);
  g_free (centred);
}

double
df_frechet_distance (const double *mu1, const double *s1,
                     const double *mu2, const double *s2, int d)
{
  double *r1 = g_new (double, (gsize) d * d);   /* [D,D] sqrt(S1) */
  double *tmp = g_new (double, (gsize) d * d);  /* [D,D] sqrt(S1) S2 */
  double *m = g_new (double, (gsize) d * d);    /* [D,D] */
  double *vecs = g_new (double, (gsize) d * d); /* [D,D] */
  double *vals = g_new (double, d);             /* [D] */
  double dist = 0, tr_sqrt = 0;

  for (int j = 0; j < d; j++)
    dist += (mu1[j] - mu2[j]) * (mu1[j] - mu2[j])
            + s1[j * d + j] + s2[j * d + j];

  /* M = sqrt(S1) S2 sqrt(S1) is symmetric positive semi-definite and similar
   * to S1 S2, so tr sqrt(S1 S2) = sum of sqrt(eig(M)). */
  df_sym_sqrt (s1, d, r1);
  for (int i = 0; i < d; i++)
    for (int j = 0; j < d; j++)
      {
        double sum = 0;
        for (int k = 0; k < d; k++)
          sum += r1[i * d + k] * s2[k * d + j];
        tmp[i * d + j] = sum;
      }
  for (int i = 0; i < d; i++)
    for (int j = i; j < d; j++)
      {
        double sum = 0;
        for (int k = 0; k < d; k++)
          sum += tmp[i * d + k] * r1[k * d + j];
        m[i * d + j] = sum;
      }
  for (int i = 0; i < d; i++)
    for (int j = 0; j < i; j++)
      m[i * d + j] = m[j * d + i];

  df_sym_eigen (m, d, vals, vecs);
  for (int k = 0; k < d; k++)
    tr_sqrt += vals[k] > 0 ? sqrt (vals[k]) : 0;
  dist -= 2 * tr_sqrt;

  g_free (vals);
  g_free (vecs);
  g_free (m);
  g_free (tmp);
  g_free (r1);
  return dist > 0 ? dist : 0;
}

/* The features are the input of the classifier's last linear layer.  Rather
 * than reach into the network, run a copy of it whose head maps D features
 * to D outputs through the identity: its "logits" are the features, exactly
 * (each output is one product by 1 plus products by 0). */
struct _DfFeatures {
  DfModel *model;
  DfUNet  *net;           /* the classifier with an identity head */
  DfGraph *graph;
  int      dim;
};

DfFeatures *
df_features_new (DfModel *classifier, GError **error)
{
  DfUNet *src;
  DfUNetConfig cfg;
  const DfParam *params;
  int n_params, k, dim = 0, n_head = 0;
  DfFeatures *f;
  const char *name;

  g_return_val_if_fail (classifier != NULL, NULL);
  name = df_model_path (classifier) ? df_model_path (classifier) : "model";

  if (!df_model_is_classifier (classifier))
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                   "%s is a diffusion model, not a classifier: features come "
                   "from a classifier file (train one with --task classifier)",
                   name);
      return NULL;
    }
  src = df_model_net (classifier);
  cfg = *df_unet_config (src);
  k = cfg.classifier_classes;

  /* The head is the last [K,D] matrix in creation order. */
  params = df_unet_params (src, &n_params);
  for (int i = n_params - 1; i >= 0; i--)
    {
      const DfTensor *t = params[i].tensor;
      if (t->ndim == 2 && t->shape[0] == k)
        {
          dim = t->shape[1];
          break;
        }
    }
  if (dim <= 0)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: no [%d, D] output layer found in the classifier",
                   name, k);
      return NULL;
    }

  f = g_new0 (DfFeatures, 1);
  f->model = classifier;
  f->dim = dim;
  cfg.classifier_classes = dim;
  f->net = df_unet_new (&cfg, TRUE, error);
  if (f->net == NULL)
    {
      g_free (f);
      return NULL;
    }

  /* Copy every parameter; the head (the only ones whose shape changed with
   * K) becomes the identity and a zero bias. */
  params = df_unet_params (f->net, &n_params);
  for (int i = 0; i < n_params; i++)
    {
      DfTensor *dst = params[i].tensor;
      DfTensor *orig = df_unet_find_param (src, params[i].name);

      if (orig != NULL && df_tensor_same_shape (dst, orig))
        memcpy (dst->data, orig->data, sizeof (float) * dst->size);
      else if (orig != NULL && dst->ndim == 2 && dst->shape[0] == dim
               && dst->shape[1] == dim && orig->shape[0] == k)
        {
          memset (dst->data, 0, sizeof (float) * dst->size);
          for (int j = 0; j < dim; j++)
            dst->data[j * dim + j] = 1;
          n_head++;
        }
      else if (orig != NULL && dst->ndim == 1 && dst->shape[0] == dim
               && orig->shape[0] == k)
        memset (dst->data, 0, sizeof (float) * dst->size);
      else
        {
          g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                       "%s: classifier parameter %s does not fit the "
                       "feature network",
                       name,
                       params[i].name);
          df_features_free (f);
          return NULL;
        }
    }
  if (n_head != 1)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "%s: expected one output layer in the classifier, found %d",
                   name,
                   n_head);
      df_features_free (f);
      return NULL;
    }
  f->graph = df_graph_new (FALSE);
  return f;
}

void
df_features_free (DfFeatures *f)
{
  if (f == NULL)
    return;
  if (f->graph)
    df_graph_free (f->graph);
  if (f->net)
    df_unet_free (f->net);
  g_free (f);
}

int
df_features_dim (DfFeatures *f)
{
  g_return_val_if_fail (f != NULL, 0);
  return f->dim;
}

gboolean
df_features_compute (DfFeatures *f, const float *x, int n, int t,
                     float *out, GError **error)
{
  int c, s;
  DfTensor *in, *y;
  float *tt;

  g_return_val_if_fail (f != NULL && x != NULL && out != NULL && n > 0, FALSE);

  c = df_model_channels (f->model);
  s = df_model_size (f->model);
  if (t < 0 || t >= df_model_schedule (f->model)->T)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_INVALID,
                   "timestep %d is outside [0, %d]", t,
                   df_model_schedule (f->model)->T - 1);
      return FALSE;
    }

  df_graph_reset (f->graph);
  in = df_graph_tensor_4d (f->graph, n, c, s, s);     /* [N,C,H,W] */
  memcpy (in->data, x, sizeof (float) * in->size);
  tt = g_new (float, n);                              /* [N] */
  for (int i = 0; i < n; i++)
    tt[i] = t;
  y = df_unet_forward (f->net, f->graph, in, tt, NULL);  /* [N,D] */
  g_free (tt);
  if (y == NULL || y->size != (gsize) n * f->dim)
    {
      g_set_error (error, DF_MODEL_ERROR, DF_MODEL_ERROR_FORMAT,
                   "the classifier's forward pass gave no [%d, %d] features",
                   n, f->dim);
      return FALSE;
    }
  memcpy (out, y->data, sizeof (float) * y->size);
  return TRUE;
}
