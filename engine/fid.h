/* fid.h: the Frechet distance between Gaussian fits of two feature sets, and
 * the classifier features it is measured in.
 *
 * Legend: N feature vectors, D features.  Matrices are row-major D x D
 * doubles.  FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1^1/2 S2 S1^1/2),
 * which equals the usual tr sqrt(S1 S2) form but needs only symmetric
 * eigendecompositions (cyclic Jacobi, in double).
 */
#pragma once

#include <glib.h>

#include "model.h"

G_BEGIN_DECLS

/* Eigendecomposition of the symmetric a[D,D] (destroyed): evals[D] ascending,
 * evecs[D,D] with eigenvector k in column k, so a = V diag(evals) V^T. */
void       df_sym_eigen           (double *a, int d, double *evals,
                                   double *evecs);
/* out[D,D] = the symmetric square root of the symmetric a[D,D]; eigenvalues
 * below zero (rounding in a positive semi-definite matrix) count as zero. */
void       df_sym_sqrt            (const double *a, int d, double *out);

/* mu[D] and the unbiased covariance cov[D,D] (divided by N - 1) of the rows
 * of f[N,D]; N must be at least 2. */
void       df_feature_stats       (const float *f, gsize n, int d,
                                   double *mu, double *cov);
/* The Frechet distance between N(mu1, s1) and N(mu2, s2). */
double     df_frechet_distance    (const double *mu1, const double *s1,
                                   const double *mu2, const double *s2,
                                   int d);

typedef struct _DfFeatures DfFeatures;

/* The penultimate features of a classifier model: the mean-pooled vector
 * that its final linear layer (weight [K,D], bias [K]) maps to logits.  The
 * model must stay alive while the result is used. */
DfFeatures *df_features_new       (DfModel *classifier, GError **error);
void        df_features_free      (DfFeatures *f);
int         df_features_dim       (DfFeatures *f);
/* out[N,D] for x[N,C,H,W] at timestep t; batch-invariant like the model. */
gboolean    df_features_compute   (DfFeatures *f, const float *x, int n,
                                   int t, float *out, GError **error);

G_END_DECLS
