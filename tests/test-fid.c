/* test-fid.c: engine/fid.c: Jacobi eigendecomposition, the symmetric square
 * root, feature statistics and the Frechet distance against torch
 * (tests/reference/fid.json from fid_reference.py), and classifier features.
 */
#include <json-glib/json-glib.h>
#include <math.h>
#include <string.h>

#include "fid.h"
#include "model.h"
#include "unet.h"

/* The fixture's formula, in double, stored as float like real features. */
static float *
make_features (int n, int d, double a, double shift, double phase)
{
  float *f = g_new (float, (gsize) n * d);   /* [N,D] */

  for (int i = 0; i < n; i++)
    for (int j = 0; j < d; j++)
      f[i * d + j] = a * (sin (0.37 * (i + 1) * (j + 1) + 0.11 * j + phase)
                          + 0.5 * cos (1.7 * i + 0.3 * j * j))
                     + shift * j / d;
  return f;
}

static double
array_get (JsonObject *o, const char *key, int i)
{
  return json_array_get_double_element (json_object_get_array_member (o, key), i);
}

static void
test_matches_torch (void)
{
  char *path = g_test_build_filename (G_TEST_DIST, "reference", "fid.json", NULL);
  JsonParser *parser = json_parser_new ();
  GError *error = NULL;
  JsonArray *cases;

  json_parser_load_from_file (parser, path, &error);
  g_assert_no_error (error);
  cases = json_object_get_array_member (
    json_node_get_object (json_parser_get_root (parser)), "cases");
  g_assert_cmpuint (json_array_get_length (cases), >=, 3);

  for (guint c = 0; c < json_array_get_length (cases); c++)
    {
      JsonObject *o = json_array_get_object_element (cases, c);
      int d = json_object_get_int_member (o, "d");
      int n1 = json_object_get_int_member (o, "n1");
      int n2 = json_object_get_int_member (o, "n2");
      float *f1 = make_features (n1, d, json_object_get_double_member (o, "a1"),
                                 0.0, 0.0);
      float *f2 = make_features (n2, d, json_object_get_double_member (o, "a2"),
                                 json_object_get_double_member (o, "shift"), 0.4);
      double *mu1 = g_new (double, d), *mu2 = g_new (double, d);
      double *s1 = g_new (double, d * d), *s2 = g_new (double, d * d);
      double *work = g_new (double, d * d), *vecs = g_new (double, d * d);
      double *vals = g_new (double, d);
      double worst_mu = 0, worst_cov = 0, worst_eval = 0, fd, want, top;

      df_feature_stats (f1, n1, d, mu1, s1);
      df_feature_stats (f2, n2, d, mu2, s2);
      for (int j = 0; j < d; j++)
        {
          worst_mu = MAX (worst_mu, fabs (mu1[j] - array_get (o, "mu1", j)));
          worst_cov = MAX (worst_cov, fabs (s1[j * d + j]
                                            - array_get (o, "cov1_diag", j)));
        }

      memcpy (work, s1, sizeof (double) * d * d);
      df_sym_eigen (work, d, vals, vecs);
      top = array_get (o, "evals1", d - 1);
      for (int j = 0; j < d; j++)
        worst_eval = MAX (worst_eval, fabs (vals[j] - array_get (o, "evals1", j)));

      fd = df_frechet_distance (mu1, s1, mu2, s2, d);
      want = json_object_get_double_member (o, "fd");
      g_test_message ("d %d: fd %.12g, torch %.12g, |diff| %.3g; worst mu %.3g, "
                      "cov diag %.3g, eigenvalue %.3g (largest %.4g)", d, fd,
                      want, fabs (fd - want), worst_mu, worst_cov, worst_eval,
                      top);
      /* Inputs agree to float32 rounding of the same formula; the rest is
       * double arithmetic in another order. */
      g_assert_cmpfloat (worst_mu, <, 1e-12);
      g_assert_cmpfloat (worst_cov, <, 1e-12);
      g_assert_cmpfloat (worst_eval, <, 1e-10 * top);
      g_assert_cmpfloat (fabs (fd - want), <, 1e-8 * MAX (1.0, want));

      g_free (f1);
      g_free (f2);
      g_free (mu1);
      g_free (mu2);
      g_free (s1);
      g_free (s2);
      g_free (work);
      g_free (vecs);
      g_free (vals);
    }
  g_object_unref (parser);
  g_free (path);
}

static void
test_identical_sets (void)
{
  int n = 300, d = 32;
  float *f = make_features (n, d, 1.0, 0.0, 0.0);
  double *mu = g_new (double, d), *s = g_new (double, d * d), fd, tr = 0;

  df_feature_stats (f, n, d, mu, s);
  for (int j = 0; j < d; j++)
    tr += s[j * d + j];
  fd = df_frechet_distance (mu, s, mu, s, d);
  g_test_message ("fd(x, x) = %.3g against trace %.4g", fd, tr);
  g_assert_cmpfloat (fd, >=, 0);
  g_assert_cmpfloat (fd, <, 1e-10 * tr);
  g_free (f);
  g_free (mu);
  g_free (s);
}

/* A = V diag(w) V^T with V orthonormal, for a dense symmetric A. */
static void
test_eigen_reconstructs (void)
{
  int d = 50;
  double *a = g_new (double, d * d), *work = g_new (double, d * d);
  double *v = g_new (double, d * d), *w = g_new (double, d);
  double worst = 0, worst_orth = 0, norm = 0;
  GRand *rand = g_rand_new_with_seed (5);

  for (int i = 0; i < d; i++)
    for (int j = 0; j <= i; j++)
      a[i * d + j] = a[j * d + i] = g_rand_double_range (rand, -1, 1);
  for (int i = 0; i < d * d; i++)
    norm = MAX (norm, fabs (a[i]));
  memcpy (work, a, sizeof (double) * d * d);
  df_sym_eigen (work, d, w, v);

  for (int i = 0; i < d; i++)
    for (int j = 0; j < d; j++)
      {
        double sum = 0, dot = 0;
        for (int k = 0; k < d; k++)
          {
            sum += v[i * d + k] * w[k] * v[j * d + k];
            dot += v[k * d + i] * v[k * d + j];
          }
        worst = MAX (worst, fabs (sum - a[i * d + j]));
        worst_orth = MAX (worst_orth, fabs (dot - (i == j)));
      }
  for (int k = 1; k < d; k++)
    g_assert_cmpfloat (w[k - 1], <=, w[k]);
  g_test_message ("worst |V W V^T - A| %.3g, |V^T V - I| %.3g", worst,
                  worst_orth);
  g_assert_cmpfloat (worst, <, 1e-12 * norm * d);
  g_assert_cmpfloat (worst_orth, <, 1e-12 * d);
  g_rand_free (rand);
  g_free (a);
  g_free (work);
  g_free (v);
  g_free (w);
}

static void
test_sqrt_squares_back (void)
{
  int d = 40;
  double *b = g_new (double, d * d), *a = g_new (double, d * d);
  double *r = g_new (double, d * d), worst = 0, norm = 0;
  GRand *rand = g_rand_new_with_seed (9);

  /* A = B B^T is positive semi-definite. */
  for (int i = 0; i < d * d; i++)
    b[i] = g_rand_double_range (rand, -1, 1);
  for (int i = 0; i < d; i++)
    for (int j = 0; j < d; j++)
      {
        double sum = 0;
        for (int k = 0; k < d; k++)
          sum += b[i * d + k] * b[j * d + k];
        a[i * d + j] = sum;
        norm = MAX (norm, fabs (sum));
      }
  df_sym_sqrt (a, d, r);
  for (int i = 0; i < d; i++)
    for (int j = 0; j < d; j++)
      {
        double sum = 0;
        for (int k = 0; k < d; k++)
          sum += r[i * d + k] * r[k * d + j];
        worst = MAX (worst, fabs (sum - a[i * d + j]));
        g_assert_cmpfloat (r[i * d + j], ==, r[j * d + i]);
      }
  g_test_message ("worst |sqrt(A)^2 - A| %.3g (max |A| %.4g)", worst, norm);
  g_assert_cmpfloat (worst, <, 1e-11 * norm);
  g_rand_free (rand);
  g_free (a);
  g_free (b);
  g_free (r);
}

static DfModel *
tiny_classifier (void)
{
  const char *names[] = { "a", "b", "c", NULL };
  DfUNetConfig cfg;
  DfSchedule *s;
  DfModel *m;
  GError *error = NULL;

  df_unet_config_init (&cfg);
  cfg.sample_size = 8;
  cfg.in_channels = cfg.out_channels = 1;
  cfg.n_blocks = 2;
  cfg.block_out_channels[0] = 8;
  cfg.block_out_channels[1] = 16;
  cfg.down_attention[1] = cfg.up_attention[0] = TRUE;
  cfg.layers_per_block = 1;
  cfg.norm_num_groups = 4;
  cfg.attention_head_dim = 8;
  cfg.classifier_classes = 3;
  s = df_schedule_new (DF_BETA_LINEAR, 1000, 0, 0, &error);
  g_assert_no_error (error);
  m = df_model_new (&cfg, TRUE, s, names, -1, &error);
  g_assert_no_error (error);
  df_unet_init (df_model_net (m), 3);
  df_schedule_free (s);
  return m;
}

/* Features through the classifier's own head give its logits. */
static void
test_features_give_logits (void)
{
  DfModel *m = tiny_classifier ();
  GError *error = NULL;
  DfFeatures *f = df_features_new (m, &error);
  const DfParam *params;
  DfTensor *w = NULL, *b = NULL;
  int n_params, n = 4, k = 3, d;
  float x[4 * 64], logits[4 * 3], *feat, *one;
  double worst = 0, worst_batch = 0, scale = 0;

  g_assert_no_error (error);
  d = df_features_dim (f);
  g_assert_cmpint (d, ==, 16);

  /* The head: the last [K, D] weight and the bias of the same name. */
  params = df_unet_params (df_model_net (m), &n_params);
  for (int i = n_params - 1; i >= 0 && w == NULL; i--)
    if (params[i].tensor->ndim == 2 && params[i].tensor->shape[0] == k
        && g_str_has_suffix (params[i].name, ".weight"))
      {
        char *bias = g_strndup (params[i].name, strlen (params[i].name) - 6);
        char *full = g_strconcat (bias, "bias", NULL);
        w = params[i].tensor;
        b = df_unet_find_param (df_model_net (m), full);
        g_free (bias);
        g_free (full);
      }
  g_assert_nonnull (w);
  g_assert_nonnull (b);
  g_assert_cmpint (w->shape[1], ==, d);

  for (int i = 0; i < n * 64; i++)
    x[i] = cosf (i * 0.21f);
  feat = g_new (float, n * d);
  one = g_new (float, d);
  df_features_compute (f, x, n, 0, feat, &error);
  g_assert_no_error (error);
  df_model_logits (m, x, n, 0, logits, &error);
  g_assert_no_error (error);
  for (int i = 0; i < n; i++)
    {
      for (int c = 0; c < k; c++)
        {
          double sum = b->data[c];
          for (int j = 0; j < d; j++)
            sum += (double) w->data[c * d + j] * feat[i * d + j];
          worst = MAX (worst, fabs (sum - logits[i * k + c]));
          scale = MAX (scale, fabs (logits[i * k + c]));
        }

      /* Sample i alone gives the same features, bit for bit. */
      df_features_compute (f, x + i * 64, 1, 0, one, &error);
      g_assert_no_error (error);
      for (int j = 0; j < d; j++)
        worst_batch = MAX (worst_batch, fabs (one[j] - feat[i * d + j]));
    }
  g_test_message ("worst |W f + b - logits| %.3g (max |logit| %.3g); "
                  "batch vs single %.3g", worst, scale, worst_batch);
  g_assert_cmpfloat (worst, <, 1e-5 * MAX (1.0, scale));
  g_assert_cmpfloat (worst_batch, ==, 0);

  g_free (feat);
  g_free (one);
  df_features_free (f);
  df_model_free (m);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/engine/fid/matches-torch", test_matches_torch);
  g_test_add_func ("/engine/fid/identical-sets-zero", test_identical_sets);
  g_test_add_func ("/engine/fid/eigen-reconstructs", test_eigen_reconstructs);
  g_test_add_func ("/engine/fid/sqrt-squares-back", test_sqrt_squares_back);
  g_test_add_func ("/engine/fid/features-give-logits",
                   test_features_give_logits);
  return g_test_run ();
}
