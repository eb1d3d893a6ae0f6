/* test-sampler.c: DDPM and DDIM against exact model-free oracles.
 *
 * Legend: N samples, P values a sample (C = 1, H = W = 2).  The oracles are
 * data distributions whose noise prediction eps*(x, t) is known in closed
 * form, so sampling can be checked without a network:
 *   Gaussian: x0 ~ N(m, s2) per value; x_t ~ N(a m, v) with a = sqrt(ab),
 *     v = ab s2 + 1 - ab, and eps* = sqrt(1 - ab) (x - a m) / v.
 *   Mixture: y in {0, 1} with p = 1/2, x0 | y ~ N(mu_y, s2 I), mu_0 = -mu,
 *     mu_1 = +mu.  With L = 2 a mu sum(x) / v, p(1 | x_t) = sigmoid (L), the
 *     conditional eps is the Gaussian one for mu_y, the unconditional one
 *     sqrt(1 - ab) (x - a mu tanh (L/2)) / v, and grad_x log p(y | x_t) =
 *     (y ? p0 : -p1) 2 a mu / v in every value.
 */
#include <math.h>
#include <string.h>

#include "rng.h"
#include "sampler.h"

#define C 1
#define H 2
#define W 2
#define P (C * H * W)

#define UNCOND 2                /* the mixture's "no class" label */

typedef struct {
  const DfSchedule *sched;
  double            m, s2;      /* Gaussian; mixture: mu, s2 */
  gboolean          mixture;
  gboolean          uncond_model;        /* mixture seen as unconditional */
  int               eps_calls, grad_calls, last_n;
  GCancellable     *cancel_at_step_of;   /* progress cancels this ... */
  int               cancel_step;         /* ... after this step */
  int               progress_calls, progress_last;
  float            *progress_x0;         /* [N,P] copy of the last x0 */
} Oracle;

/* Gaussian eps for mean m at timestep t. */
static double
gauss_eps (const DfSchedule *s, double s2, double m, int t, double x)
{
  double ab = s->alphas_cumprod[t];

  return sqrt (1 - ab) * (x - sqrt (ab) * m) / (ab * s2 + 1 - ab);
}

/* The mixture's p(1 | x_t) for one sample's values x[P]. */
static double
mixture_p1 (const Oracle *o, int t, const float *x)
{
  double ab = o->sched->alphas_cumprod[t], sum = 0, L;

  for (int j = 0; j < P; j++)
    sum += x[j];
  L = 2 * sqrt (ab) * o->m * sum / (ab * o->s2 + 1 - ab);
  return 0.5 * (1 + tanh (L / 2));
}

static void
oracle_eps_one (const Oracle *o, const float *x, int t, int label, float *eps)
{
  double ab = o->sched->alphas_cumprod[t], v = ab * o->s2 + 1 - ab;

  if (!o->mixture)
    {
      for (int j = 0; j < P; j++)
        eps[j] = (float) gauss_eps (o->sched, o->s2, o->m, t, x[j]);
      return;
    }
  if (label == 0 || label == 1)
    {
      double mean = label ? o->m : -o->m;

      for (int j = 0; j < P; j++)
        eps[j] = (float) gauss_eps (o->sched, o->s2, mean, t, x[j]);
      return;
    }
  g_assert_cmpint (label, ==, UNCOND);
  {
    double e_mu = o->m * (2 * mixture_p1 (o, t, x) - 1);

    for (int j = 0; j < P; j++)
      eps[j] = (float) (sqrt (1 - ab) * (x[j] - sqrt (ab) * e_mu) / v);
  }
}

static gboolean
oracle_eps (gpointer data, const float *x, int n, int t, const int *labels,
            float *eps, GError **error)
{
  Oracle *o = data;

  o->eps_calls++;
  o->last_n = n;
  for (int i = 0; i < n; i++)
    oracle_eps_one (o, x + i * P, t, labels ? labels[i] : UNCOND,
                    eps + i * P);
  return TRUE;
}

static void
oracle_grad_one (const Oracle *o, const float *x, int t, int label,
                 float *grad)
{
  double ab = o->sched->alphas_cumprod[t], v = ab * o->s2 + 1 - ab;
  double p1 = mixture_p1 (o, t, x);
  double g = (label ? 1 - p1 : -p1) * 2 * sqrt (ab) * o->m / v;

  for (int j = 0; j < P; j++)
    grad[j] = (float) g;
}

static gboolean
oracle_grad (gpointer data, const float *x, int n, int t, const int *labels,
             float *grad, GError **error)
{
  Oracle *o = data;

  o->grad_calls++;
  g_assert_nonnull (labels);
  for (int i = 0; i < n; i++)
    oracle_grad_one (o, x + i * P, t, labels[i], grad + i * P);
  return TRUE;
}

static void
oracle_progress (gpointer data, int step, int total, const float *x0, int n)
{
  Oracle *o = data;

  o->progress_calls++;
  g_assert_cmpint (step, ==, o->progress_last + 1);
  o->progress_last = step;
  g_assert_nonnull (x0);
  if (o->progress_x0 != NULL)
    memcpy (o->progress_x0, x0, (gsize) n * P * sizeof (float));
  if (o->cancel_at_step_of != NULL && step == o->cancel_step)
    g_cancellable_cancel (o->cancel_at_step_of);
}

static DfSchedule *
linear_schedule (void)
{
  GError *error = NULL;
  DfSchedule *s = df_schedule_new (DF_BETA_LINEAR, 1000, 0, 0, &error);

  g_assert_no_error (error);
  return s;
}

static DfDenoiser
denoiser (Oracle *o)
{
  DfDenoiser d = { C, H, W, 0, -1, oracle_eps, o, NULL, NULL };

  /* A class-conditional model with an unconditional class, or (for
   * classifier guidance) an unconditional one: eps then gets no labels. */
  if (o->mixture)
    {
      d.num_classes = o->uncond_model ? 0 : 2;
      d.uncond_label = o->uncond_model ? -1 : UNCOND;
      d.class_grad = oracle_grad;
      d.grad_data = o;
    }
  return d;
}

/* out[N,P] from df_sample, which must succeed. */
static float *
run (Oracle *o, const DfSampleParams *p, guint64 first, int n,
     const float *x_T)
{
  DfDenoiser d = denoiser (o);
  float *out = g_new (float, (gsize) n * P);
  GError *error = NULL;

  g_assert_true (df_sample (o->sched, &d, p, first, n, x_T, out, NULL, NULL,
                            NULL, &error));
  g_assert_no_error (error);
  return out;
}

/* ---- Gaussian oracle: the distribution of the samples ---------------- */

/* The exact mean and variance of the sampler's output under the Gaussian
 * oracle, from x_T ~ N(0, 1): each step is affine in x_t plus independent
 * noise, x_s = A x_t + B + sigma z, so (mean, var) propagate exactly.  The
 * coefficients are DESIGN.md's formulas, written again here. */
static void
exact_chain (const DfSchedule *s, const DfSampleParams *p, double m,
             double s2, double *mean, double *var)
{
  int S = p->steps, *ts = g_new (int, S);
  double mu = 0, V = 1;

  g_assert_true (df_schedule_timesteps (s, S, p->spacing, ts, NULL));
  for (int k = 0; k < S; k++)
    {
      double ab_t = s->alphas_cumprod[ts[k]];
      double ab_s = k + 1 < S ? s->alphas_cumprod[ts[k + 1]]
                  : p->final_alpha_one ? 1.0 : s->alphas_cumprod[0];
      double kk = sqrt (1 - ab_t) / (ab_t * s2 + 1 - ab_t);
      /* eps = Ae x + Be, x0 = A0 x + B0 */
      double Ae = kk, Be = -kk * sqrt (ab_t) * m;
      double A0 = (1 - sqrt (1 - ab_t) * Ae) / sqrt (ab_t);
      double B0 = -sqrt (1 - ab_t) * Be / sqrt (ab_t);
      double A, B, noise;

      if (p->sampler == DF_SAMPLER_DDIM)
        {
          double sig2 = p->eta * p->eta * (1 - ab_s) / (1 - ab_t)
                        * (1 - ab_t / ab_s);
          double ce = sqrt (1 - ab_s - sig2);

          A = sqrt (ab_s) * A0 + ce * Ae;
          B = sqrt (ab_s) * B0 + ce * Be;
          noise = sig2;
        }
      else
        {
          double alpha = ab_t / ab_s, beta = 1 - alpha;
          double cx0 = sqrt (ab_s) * beta / (1 - ab_t);
          double cxt = sqrt (alpha) * (1 - ab_s) / (1 - ab_t);

          A = cx0 * A0 + cxt;
          B = cx0 * B0;
          noise = k == S - 1 ? 0
                  : p->variance == DF_VARIANCE_FIXED_LARGE ? beta
                  : beta * (1 - ab_s) / (1 - ab_t);
        }
      mu = A * mu + B;
      V = A * A * V + noise;
    }
  *mean = mu;
  *var = V;
  g_free (ts);
}

/* N = 4096 samples x P = 4 iid values.  The sample mean must be within
 * 4 standard errors (sqrt (V/NP)) of the chain's exact mean, the sample
 * variance within 4 SE (V sqrt (2/(NP-1))) of its exact variance, and the
 * exact chain within disc_tol of the data's m and s2 (discretisation and
 * the x_T ~ N(0, 1) start; printed). */
static void
check_gaussian (DfSamplerKind kind, int steps, double eta, DfVariance var,
                double disc_tol)
{
  const int N = 4096;
  const double m = 0.5, s2 = 0.25;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, m, s2, FALSE };
  DfSampleParams p;
  float *out;
  double sum = 0, sq = 0, mean, v, ex_mean, ex_var, se_m, se_v;
  int nv = N * P;

  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.sampler = kind;
  p.steps = steps;
  p.eta = eta;
  p.variance = var;
  p.seed = 11;
  out = run (&o, &p, 0, N, NULL);
  g_assert_cmpint (o.eps_calls, ==, steps);

  for (int i = 0; i < nv; i++)
    sum += out[i];
  mean = sum / nv;
  for (int i = 0; i < nv; i++)
    sq += (out[i] - mean) * (out[i] - mean);
  v = sq / (nv - 1);

  exact_chain (s, &p, m, s2, &ex_mean, &ex_var);
  se_m = sqrt (ex_var / nv);
  se_v = ex_var * sqrt (2.0 / (nv - 1));
  g_test_message ("%s %d steps eta %g: mean %.5f var %.5f; exact chain "
                  "mean %.5f var %.5f; data %.3f %.3f; |mean - chain| = "
                  "%.2f SE, |var - chain| = %.2f SE",
                  kind == DF_SAMPLER_DDIM ? "DDIM" : "DDPM", steps, eta,
                  mean, v, ex_mean, ex_var, m, s2,
                  fabs (mean - ex_mean) / se_m, fabs (v - ex_var) / se_v);
  g_assert_cmpfloat (fabs (mean - ex_mean), <, 4 * se_m);
  g_assert_cmpfloat (fabs (v - ex_var), <, 4 * se_v);
  g_assert_cmpfloat (fabs (ex_mean - m), <, disc_tol);
  g_assert_cmpfloat (fabs (ex_var - s2), <, disc_tol);
  g_free (out);
  df_schedule_free (s);
}

/* Discretisation tolerances.  The exact chain's variance falls short of s2
 * by about c/S, first order in the step count (computed the same way with
 * numpy for S = 50..1000): c = 1.4 for DDIM eta 0, 3.1 for DDIM eta 1 and
 * strided DDPM; full-length DDPM is 3.9e-3 short (fixed_small) or 7.5e-4
 * over (fixed_large).  The mean is short by s sqrt(ab_T) m = 1.6e-3 for
 * DDIM (x_T ~ N(0, 1) instead of N(sqrt(ab_T) m, ~1)). */
static void
test_gaussian_ddpm (void)
{
  check_gaussian (DF_SAMPLER_DDPM, 1000, 0, DF_VARIANCE_FIXED_SMALL, 5e-3);
}

static void
test_gaussian_ddpm_large (void)
{
  check_gaussian (DF_SAMPLER_DDPM, 1000, 0, DF_VARIANCE_FIXED_LARGE, 5e-3);
}

static void
test_gaussian_ddim_eta0 (void)
{
  check_gaussian (DF_SAMPLER_DDIM, 100, 0, DF_VARIANCE_FIXED_SMALL, 2e-2);
}

static void
test_gaussian_ddim_eta1 (void)
{
  check_gaussian (DF_SAMPLER_DDIM, 100, 1, DF_VARIANCE_FIXED_SMALL, 4e-2);
}

/* Strided DDPM with fixed_small loses variance for this data: the posterior
 * q(x_s | x_t, x0) with x0 = E[x0 | x_t] ignores x0's spread, which 1000
 * small steps hide but 100 large ones do not (exact chain: 0.219 for 0.25).
 * That is the method, not the code: the samples still match the chain. */
static void
test_gaussian_ddpm_strided (void)
{
  check_gaussian (DF_SAMPLER_DDPM, 100, 0, DF_VARIANCE_FIXED_SMALL, 4e-2);
}

/* DDIM at eta 1 is strided DDPM with fixed_small: sigma^2 is the posterior
 * variance and sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps its mean, and
 * both draw step k's noise from the same stream.  Same samples up to float
 * rounding of the two ways of writing the mean (bound 1e-4). */
static void
test_ddim_eta1_is_ddpm (void)
{
  const int N = 512;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 0.5, 0.25, FALSE };
  DfSampleParams p;
  float *ddim, *ddpm;
  double worst = 0;

  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.steps = 40;
  p.seed = 6;
  p.eta = 1;
  ddim = run (&o, &p, 0, N, NULL);
  p.sampler = DF_SAMPLER_DDPM;
  ddpm = run (&o, &p, 0, N, NULL);
  for (int i = 0; i < N * P; i++)
    worst = MAX (worst, fabs (ddim[i] - ddpm[i]));
  g_test_message ("worst |DDIM eta 1 - DDPM| %.3g", worst);
  g_assert_cmpfloat (worst, <, 1e-4);
  g_free (ddim);
  g_free (ddpm);
  df_schedule_free (s);
}

/* ---- Determinism and noise keys ---------------------------------------- */

static void
assert_same_bits (const float *a, const float *b, gsize n)
{
  gsize diff = 0;

  for (gsize i = 0; i < n; i++)
    diff += memcmp (&a[i], &b[i], sizeof (float)) != 0;
  if (diff)
    g_test_message ("%" G_GSIZE_FORMAT " of %" G_GSIZE_FORMAT " values "
                    "differ", diff, n);
  g_assert_cmpuint (diff, ==, 0);
}

/* DDIM at eta 0 uses no noise after x_T: the same bits twice, and the same
 * bits whatever the seed once x_T is given. */
static void
test_ddim_deterministic (void)
{
  const int N = 16;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 0.3, 0.5, FALSE };
  DfSampleParams p;
  float x_T[16 * P], *a, *b, *c;

  for (int i = 0; i < N; i++)
    df_sample_initial_noise (5, i, P, x_T + i * P);
  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.steps = 20;
  p.seed = 1;
  a = run (&o, &p, 0, N, x_T);
  b = run (&o, &p, 0, N, x_T);
  p.seed = 999;
  c = run (&o, &p, 0, N, x_T);
  assert_same_bits (a, b, N * P);
  assert_same_bits (a, c, N * P);
  g_free (a);
  g_free (b);
  g_free (c);
  df_schedule_free (s);
}

/* x_T = NULL draws df_sample_initial_noise (seed, first + i); step k's
 * noise is df_rng_normal (seed, first + i, k): two DDIM eta-1 steps by
 * hand, the second to ab = 1 (no noise). */
static void
test_noise_keys (void)
{
  const guint64 seed = 77, first = 5;
  const int N = 3;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 0.2, 0.3, FALSE };
  DfSampleParams p;
  float *out, x_T[3 * P], *given;
  int ts[2];
  double worst = 0;

  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.steps = 2;
  p.eta = 1;
  p.seed = seed;
  out = run (&o, &p, first, N, NULL);
  for (int i = 0; i < N; i++)
    df_sample_initial_noise (seed, first + i, P, x_T + i * P);
  given = run (&o, &p, first, N, x_T);
  assert_same_bits (out, given, N * P);

  g_assert_true (df_schedule_timesteps (s, 2, p.spacing, ts, NULL));
  for (int i = 0; i < N; i++)
    {
      float z[P];
      double ab0 = s->alphas_cumprod[ts[0]], ab1 = s->alphas_cumprod[ts[1]];
      double sig = sqrt ((1 - ab1) / (1 - ab0) * (1 - ab0 / ab1));

      df_rng_normal (seed, first + i, 0, z, P);
      for (int j = 0; j < P; j++)
        {
          double x = x_T[i * P + j];
          double e = gauss_eps (s, o.s2, o.m, ts[0], x);
          double x0 = (x - sqrt (1 - ab0) * e) / sqrt (ab0);
          double x1 = sqrt (ab1) * x0 + sqrt (1 - ab1 - sig * sig) * e
                      + sig * z[j];
          double e1 = gauss_eps (s, o.s2, o.m, ts[1], (float) x1);
          double x00 = ((float) x1 - sqrt (1 - ab1) * e1) / sqrt (ab1);

          worst = MAX (worst, fabs (x00 - out[i * P + j]));
        }
    }
  g_test_message ("worst difference from the hand computation %.3g", worst);
  g_assert_cmpfloat (worst, <, 1e-5);
  g_free (out);
  g_free (given);
  df_schedule_free (s);
}

/* Sample i of a batch equals the same index alone, bit for bit, for DDPM,
 * DDIM with noise and guided sampling. */
static void
test_batch_invariance (void)
{
  const int N = 8;
  const guint64 first = 3;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 0.5, 0.25, TRUE };
  DfSampleParams p;

  for (int c = 0; c < 4; c++)
    {
      float *batch;

      df_sample_params_init (&p);
      p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
      p.seed = 1234;
      p.steps = 25;
      if (c == 0)
        p.sampler = DF_SAMPLER_DDPM;
      if (c == 1)
        p.eta = 1;
      if (c == 2)
        {
          p.guidance = DF_GUIDANCE_FREE;
          p.label = 1;
          p.scale = 3;
          p.eta = 0.5;
        }
      if (c == 3)
        {
          p.sampler = DF_SAMPLER_DDPM;
          p.guidance = DF_GUIDANCE_CLASSIFIER;
          p.label = 0;
          p.scale = 2;
          p.clip_x0 = TRUE;
        }
      batch = run (&o, &p, first, N, NULL);
      for (int i = 0; i < N; i++)
        {
          float *one = run (&o, &p, first + i, 1, NULL);

          assert_same_bits (batch + i * P, one, P);
          g_free (one);
        }
      g_free (batch);
    }
  df_schedule_free (s);
}

/* A batch large enough for the threaded step (N P >= 65536 values) equals
 * the same samples run in serial chunks of 1000, bit for bit. */
static void
test_threaded_batch (void)
{
  const int N = 20000, chunk = 1000;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 0.5, 0.25, FALSE };
  DfSampleParams p;
  float *big;

  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.sampler = DF_SAMPLER_DDPM;
  p.steps = 8;
  p.seed = 99;
  big = run (&o, &p, 0, N, NULL);
  for (int c = 0; c < N; c += chunk)
    {
      float *part = run (&o, &p, c, chunk, NULL);

      assert_same_bits (big + (gsize) c * P, part, (gsize) chunk * P);
      g_free (part);
    }
  g_free (big);
  df_schedule_free (s);
}

/* ---- Guidance ------------------------------------------------------------ */

/* Free guidance at scale 1 is conditional sampling, bit for bit, with one
 * n-sample call a step. */
static void
test_free_scale_one (void)
{
  const int N = 64;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 0.5, 0.25, TRUE };
  DfSampleParams p;
  float *cond, *free1;

  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.steps = 30;
  p.eta = 1;
  p.seed = 3;
  p.label = 1;
  cond = run (&o, &p, 0, N, NULL);
  p.guidance = DF_GUIDANCE_FREE;
  p.scale = 1;
  o.eps_calls = 0;
  free1 = run (&o, &p, 0, N, NULL);
  g_assert_cmpint (o.eps_calls, ==, 30);
  g_assert_cmpint (o.last_n, ==, N);
  assert_same_bits (cond, free1, N * P);
  g_free (cond);
  g_free (free1);
  df_schedule_free (s);
}

/* Free guidance at scale 0 is unconditional sampling, bit for bit. */
static void
test_free_scale_zero (void)
{
  const int N = 64;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 0.5, 0.25, TRUE };
  DfSampleParams p;
  float *uncond, *free0;

  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.sampler = DF_SAMPLER_DDPM;
  p.steps = 40;
  p.seed = 8;
  uncond = run (&o, &p, 0, N, NULL);
  p.guidance = DF_GUIDANCE_FREE;
  p.label = 0;
  p.scale = 0;
  free0 = run (&o, &p, 0, N, NULL);
  assert_same_bits (uncond, free0, N * P);
  g_free (uncond);
  g_free (free0);
  df_schedule_free (s);
}

/* Fraction of samples on class y's side (sum of values of y's sign). */
static double
class_side (const float *out, int n, int label)
{
  int on = 0;

  for (int i = 0; i < n; i++)
    {
      double sum = 0;

      for (int j = 0; j < P; j++)
        sum += out[i * P + j];
      on += label ? sum > 0 : sum < 0;
    }
  return on / (double) n;
}

/* Classifier guidance pulls samples toward the class: the fraction on the
 * class's side grows with the scale, for DDIM and DDPM and both classes.
 * With N = 2048 a fraction's SE is at most 0.011 (0.05 is 4.5 SE);
 * unguided it is 1/2.  At scale 1 DDIM is exact conditional sampling, so
 * the sum of a sample's P values is N(2, 4 v) with v = 0.223 the 50-step
 * chain's variance (see test_gaussian_*): Phi(2 / sqrt(4 v)) = 0.983, SE
 * 0.0028 (bound 0.012, 4 SE). */
static void
test_classifier_shifts (void)
{
  static const double scales[] = { 0, 0.25, 1, 4 };
  const int N = 2048;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 0.5, 0.25, TRUE, TRUE };
  DfSampleParams p;

  for (int kind = 0; kind < 2; kind++)
    for (int label = 0; label < 2; label++)
      {
        double frac[4];

        for (unsigned k = 0; k < G_N_ELEMENTS (scales); k++)
          {
            float *out;

            df_sample_params_init (&p);
            p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
            p.sampler = kind ? DF_SAMPLER_DDPM : DF_SAMPLER_DDIM;
            p.steps = kind ? 200 : 50;
            p.seed = 21;
            p.label = label;
            p.guidance = DF_GUIDANCE_CLASSIFIER;
            p.scale = scales[k];
            o.grad_calls = 0;
            out = run (&o, &p, 0, N, NULL);
            g_assert_cmpint (o.grad_calls, ==, p.steps);
            frac[k] = class_side (out, N, label);
            g_free (out);
          }
        g_test_message ("%s class %d: fraction on its side at scale 0, "
                        "0.25, 1, 4: %.4f %.4f %.4f %.4f",
                        kind ? "DDPM" : "DDIM", label, frac[0], frac[1],
                        frac[2], frac[3]);
        g_assert_cmpfloat (fabs (frac[0] - 0.5), <, 0.05);
        g_assert_cmpfloat (frac[1], >, frac[0] + 0.05);
        g_assert_cmpfloat (frac[2], >, frac[1] + 0.05);
        g_assert_cmpfloat (frac[3], >=, frac[2]);
        g_assert_cmpfloat (frac[2], >, 0.9);
        if (kind == 0)
          g_assert_cmpfloat (fabs (frac[2] - 0.983), <, 0.012);
      }
  df_schedule_free (s);
}

/* DDIM with the exact classifier gradient at scale 1 is conditional DDIM:
 * eps_u - sqrt(1 - ab) grad log p(y | x) = eps_c, so the samples agree up
 * to float rounding (bound 1e-4). */
static void
test_classifier_exact (void)
{
  const int N = 256;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 0.5, 0.25, TRUE };
  DfSampleParams p;
  float *cond, *guided;
  double worst = 0;

  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.steps = 50;
  p.seed = 4;
  p.label = 1;
  cond = run (&o, &p, 0, N, NULL);
  p.guidance = DF_GUIDANCE_CLASSIFIER;
  o.uncond_model = TRUE;
  guided = run (&o, &p, 0, N, NULL);
  for (int i = 0; i < N * P; i++)
    worst = MAX (worst, fabs (cond[i] - guided[i]));
  g_test_message ("worst |classifier-guided - conditional| %.3g", worst);
  g_assert_cmpfloat (worst, <, 1e-4);
  g_free (cond);
  g_free (guided);
  df_schedule_free (s);
}

/* The mean of n samples' values. */
static double
mean_value (const float *out, int n)
{
  double sum = 0;

  for (int i = 0; i < n * P; i++)
    sum += out[i];
  return sum / (n * P);
}

/* The timesteps and batch sizes of every eps call, for the interval test. */
typedef struct {
  Oracle  o;
  int     calls, t[64], n[64];
} Tracer;

static gboolean
tracer_eps (gpointer data, const float *x, int n, int t, const int *labels,
            float *eps, GError **error)
{
  Tracer *tr = data;

  g_assert_cmpint (tr->calls, <, 64);
  tr->t[tr->calls] = t;
  tr->n[tr->calls++] = n;
  return oracle_eps (&tr->o, x, n, t, labels, eps, error);
}

/* Guidance limited to noise levels in (lo, hi]: free guidance runs both
 * halves exactly at the steps whose sigma_t is inside and one conditional
 * half elsewhere; an interval that holds no step is plain conditional
 * sampling bit for bit, one that holds every step is full guidance bit for
 * bit, and one that holds some lands between the two in how far samples
 * are pushed towards their class (the mean of their values).  Classifier
 * guidance outside the interval calls no classifier.  Sigma at DDIM's 20
 * leading steps of this schedule: 0.01 (t 0) to 78 (t 950); (0.5, 5]
 * holds t 150..550. */
static void
test_guidance_interval (void)
{
  const int N = 512, S = 20;
  DfSchedule *s = linear_schedule ();
  Tracer tr = { { s, 0.5, 0.25, TRUE } };
  DfDenoiser d = denoiser (&tr.o);
  DfSampleParams p;
  float *cond, *full, *part, *none, *cls;
  double lo = 0.5, hi = 5.0;
  int guided = 0;
  GError *error = NULL;

  d.eps = tracer_eps;
  d.eps_data = &tr;
  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.steps = S;
  p.seed = 12;
  p.label = 1;
  cond = run (&tr.o, &p, 0, N, NULL);
  p.guidance = DF_GUIDANCE_FREE;
  p.scale = 4;
  full = run (&tr.o, &p, 0, N, NULL);

  p.guide_lo = lo;
  p.guide_hi = hi;
  part = g_new (float, N * P);
  g_assert_true (df_sample (s, &d, &p, 0, N, NULL, part, NULL, NULL, NULL,
                            &error));
  g_assert_no_error (error);
  g_assert_cmpint (tr.calls, ==, S);
  for (int k = 0; k < S; k++)
    {
      double ab = s->alphas_cumprod[tr.t[k]], sig = sqrt ((1 - ab) / ab);
      gboolean inside = sig > lo && sig <= hi;

      g_assert_cmpint (tr.n[k], ==, inside ? 2 * N : N);
      guided += inside;
    }
  g_test_message ("guided at %d of %d steps", guided, S);
  g_assert_cmpint (guided, ==, 9);
  g_assert_cmpint (df_sample_guided_steps (s, &p), ==, guided);

  /* No step inside: conditional; every step inside: full guidance. */
  p.guide_lo = 1e6;
  p.guide_hi = 1e7;
  g_assert_cmpint (df_sample_guided_steps (s, &p), ==, 0);
  none = run (&tr.o, &p, 0, N, NULL);
  assert_same_bits (cond, none, N * P);
  g_free (none);
  p.guide_lo = 0.001;
  p.guide_hi = 1000;
  g_assert_cmpint (df_sample_guided_steps (s, &p), ==, S);
  none = run (&tr.o, &p, 0, N, NULL);
  assert_same_bits (full, none, N * P);
  /* How far towards class 1 (+mu): the mean of the samples' values.  Free
   * guidance at scale 4 pushes past the class mean, and pushes further
   * the more steps it guides. */
  {
    double mc = mean_value (cond, N), mp = mean_value (part, N);
    double mf = mean_value (full, N);

    g_test_message ("mean value: conditional %.4f, interval %.4f, full %.4f",
                    mc, mp, mf);
    g_assert_cmpfloat (mc, <, mp - 0.01);
    g_assert_cmpfloat (mp, <, mf - 0.01);
  }

  /* Classifier guidance: gradients only inside. */
  tr.o.uncond_model = TRUE;
  p.guidance = DF_GUIDANCE_CLASSIFIER;
  p.guide_lo = lo;
  p.guide_hi = hi;
  tr.o.grad_calls = 0;
  cls = run (&tr.o, &p, 0, N, NULL);
  g_assert_cmpint (tr.o.grad_calls, ==, guided);
  g_free (cls);

  g_free (cond);
  g_free (full);
  g_free (part);
  g_free (none);
  df_schedule_free (s);
}

/* One step by hand: t = 999 (trailing, S = 1) to ab_0 (final_alpha_one
 * off), so every coefficient is non-trivial; x_T a fixed draw.  Classifier
 * guidance over an unconditional model starts from eps_u, over a
 * conditional one from eps_c (the label goes to both, as guided-diffusion
 * does). */
static void
check_one_step (DfSamplerKind kind, DfGuidance guidance, double scale,
                gboolean clip, DfVariance variance, double m,
                gboolean uncond_model)
{
  const int N = 4;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, m, 0.25, TRUE, uncond_model };
  DfSampleParams p;
  float x_T[4 * P], *out;
  double ab_t = s->alphas_cumprod[999], ab_s = s->alphas_cumprod[0];
  double sa = sqrt (ab_t), sb = sqrt (1 - ab_t), worst = 0;
  const int label = 1;

  for (int i = 0; i < N; i++)
    df_rng_normal (100, i, 0, x_T + i * P, P);
  for (int i = 0; i < N * P; i++)
    x_T[i] *= 2;   /* spread x0 beyond [-1, 1] for the clip */
  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.sampler = kind;
  p.steps = 1;
  p.spacing = DF_SPACING_TRAILING;
  p.final_alpha_one = FALSE;
  p.guidance = guidance;
  p.label = label;
  p.scale = scale;
  p.clip_x0 = clip;
  p.variance = variance;
  out = run (&o, &p, 0, N, x_T);

  for (int i = 0; i < N; i++)
    {
      float ec[P], eu[P], g[P];
      const float *x = x_T + i * P;

      oracle_eps_one (&o, x, 999, label, ec);
      oracle_eps_one (&o, x, 999, UNCOND, eu);
      oracle_grad_one (&o, x, 999, label, g);
      for (int j = 0; j < P; j++)
        {
          double e, x0, want;

          /* eps as DESIGN.md guides it. */
          if (guidance == DF_GUIDANCE_FREE)
            e = (float) (eu[j] + scale * ((double) ec[j] - eu[j]));
          else if (guidance == DF_GUIDANCE_CLASSIFIER)
            e = (uncond_model ? eu[j] : ec[j])
                - (kind == DF_SAMPLER_DDIM ? scale * sb * g[j] : 0);
          else
            e = ec[j];
          x0 = (x[j] - sb * e) / sa;
          if (clip && fabs (x0) > 1)
            {
              x0 = x0 > 0 ? 1 : -1;
              e = (x[j] - sa * x0) / sb;
            }

          if (kind == DF_SAMPLER_DDIM)
            want = sqrt (ab_s) * x0 + sqrt (1 - ab_s) * e;   /* eta 0 */
          else
            {
              double beta = 1 - ab_t / ab_s;
              double var = variance == DF_VARIANCE_FIXED_LARGE
                           ? beta : beta * (1 - ab_s) / (1 - ab_t);

              want = sqrt (ab_s) * beta / (1 - ab_t) * x0
                     + sqrt (1 - beta) * (1 - ab_s) / (1 - ab_t) * x[j];
              if (guidance == DF_GUIDANCE_CLASSIFIER)
                want += scale * var * g[j];
            }
          worst = MAX (worst, fabs (want - out[i * P + j]));
        }
    }
  g_test_message ("%s guidance %d scale %g clip %d uncond model %d: worst "
                  "difference from the hand computation %.3g",
                  kind ? "DDPM" : "DDIM", guidance, scale, clip,
                  uncond_model, worst);
  g_assert_cmpfloat (worst, <, 1e-5);
  g_free (out);
  df_schedule_free (s);
}

static void
test_one_step_by_hand (void)
{
  check_one_step (DF_SAMPLER_DDIM, DF_GUIDANCE_CLASSIFIER, 2.5, FALSE,
                  DF_VARIANCE_FIXED_SMALL, 0.5, TRUE);
  check_one_step (DF_SAMPLER_DDIM, DF_GUIDANCE_CLASSIFIER, 2.5, FALSE,
                  DF_VARIANCE_FIXED_SMALL, 0.5, FALSE);
  check_one_step (DF_SAMPLER_DDIM, DF_GUIDANCE_FREE, 3, FALSE,
                  DF_VARIANCE_FIXED_SMALL, 0.5, FALSE);
  check_one_step (DF_SAMPLER_DDIM, DF_GUIDANCE_NONE, 1, TRUE,
                  DF_VARIANCE_FIXED_SMALL, 3, FALSE);
  check_one_step (DF_SAMPLER_DDPM, DF_GUIDANCE_CLASSIFIER, 2.5, FALSE,
                  DF_VARIANCE_FIXED_LARGE, 0.5, TRUE);
  check_one_step (DF_SAMPLER_DDPM, DF_GUIDANCE_CLASSIFIER, 1.5, TRUE,
                  DF_VARIANCE_FIXED_SMALL, 0.5, TRUE);
  check_one_step (DF_SAMPLER_DDPM, DF_GUIDANCE_FREE, -0.5, FALSE,
                  DF_VARIANCE_FIXED_SMALL, 0.5, FALSE);
}

/* With clip_x0 every progress x0 and (final ab = 1) the output are in
 * [-1, 1] even when the data's mean is 3. */
static void
test_clip (void)
{
  const int N = 256;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 3, 0.25, FALSE };
  DfDenoiser d = denoiser (&o);
  DfSampleParams p;
  float *out = g_new (float, N * P);
  GError *error = NULL;

  o.progress_x0 = g_new (float, N * P);
  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.steps = 10;
  p.eta = 1;
  p.clip_x0 = TRUE;
  g_assert_true (df_sample (s, &d, &p, 0, N, NULL, out, oracle_progress, &o,
                            NULL, &error));
  g_assert_no_error (error);
  for (int i = 0; i < N * P; i++)
    {
      g_assert_cmpfloat (fabs (out[i]), <=, 1);
      g_assert_cmpfloat (out[i], ==, o.progress_x0[i]);
    }
  g_free (o.progress_x0);
  g_free (out);
  df_schedule_free (s);
}

/* ---- Progress, cancellation, parameters ---------------------------------- */

/* Progress runs once a step, steps 1..S of S; the last x0 is the output when
 * the final step goes to ab = 1 (DDIM, eta 0). */
static void
test_progress (void)
{
  const int N = 5;
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 0.1, 0.2, FALSE };
  DfDenoiser d = denoiser (&o);
  DfSampleParams p;
  float out[5 * P], x0[5 * P];
  GError *error = NULL;

  o.progress_x0 = x0;
  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.steps = 17;
  g_assert_true (df_sample (s, &d, &p, 0, N, NULL, out, oracle_progress, &o,
                            NULL, &error));
  g_assert_no_error (error);
  g_assert_cmpint (o.progress_calls, ==, 17);
  g_assert_cmpint (o.progress_last, ==, 17);
  assert_same_bits (out, x0, N * P);
  df_schedule_free (s);
}

/* A cancel during step 3's progress stops before step 4; a cancel before
 * the call runs no step. */
static void
test_cancel (void)
{
  DfSchedule *s = linear_schedule ();
  Oracle o = { s, 0.1, 0.2, FALSE };
  DfDenoiser d = denoiser (&o);
  DfSampleParams p;
  GCancellable *cancel = g_cancellable_new ();
  float out[2 * P];
  GError *error = NULL;

  df_sample_params_init (&p);
  p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
  p.steps = 10;
  o.cancel_at_step_of = cancel;
  o.cancel_step = 3;
  g_assert_false (df_sample (s, &d, &p, 0, 2, NULL, out, oracle_progress, &o,
                             cancel, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_clear_error (&error);
  g_assert_cmpint (o.eps_calls, ==, 3);
  g_assert_cmpint (o.progress_calls, ==, 3);

  o.eps_calls = 0;
  g_assert_false (df_sample (s, &d, &p, 0, 2, NULL, out, NULL, NULL, cancel,
                             &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_clear_error (&error);
  g_assert_cmpint (o.eps_calls, ==, 0);
  g_object_unref (cancel);
  df_schedule_free (s);
}

/* Each bad parameter is a DF_SAMPLER_ERROR_INVALID from the check and from
 * df_sample, which then calls nothing. */
static void
test_bad_params (void)
{
  DfSchedule *s = linear_schedule ();
  Oracle gauss = { s, 0, 1, FALSE }, mix = { s, 0.5, 0.25, TRUE };
  DfDenoiser dg = denoiser (&gauss), dm = denoiser (&mix), dm_nograd;
  DfDenoiser dm_nouncond;
  float out[P];

  dm_nograd = dm;
  dm_nograd.class_grad = NULL;
  dm_nouncond = dm;
  dm_nouncond.uncond_label = -1;

  for (int c = 0; c < 21; c++)
    {
      DfSampleParams p;
      const DfDenoiser *d = &dm;
      GError *error = NULL;

      df_sample_params_init (&p);
      p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
      switch (c)
        {
        case 0: p.steps = 0; break;
        case 1: p.steps = 1001; break;
        case 2: p.eta = -0.1; break;
        case 3: p.eta = NAN; break;
        case 4: p.eta = INFINITY; break;
        case 5: p.label = 2; break;
        case 6: p.label = -2; break;
        case 7: p.label = 0; d = &dg; break;   /* unconditional model */
        case 8: p.guidance = DF_GUIDANCE_FREE; break;   /* no label */
        case 9: p.guidance = DF_GUIDANCE_FREE; p.label = 0; d = &dg; break;
        case 10:
          p.guidance = DF_GUIDANCE_FREE; p.label = 0; d = &dm_nouncond;
          break;
        case 11: p.guidance = DF_GUIDANCE_CLASSIFIER; break;   /* no label */
        case 12:
          p.guidance = DF_GUIDANCE_CLASSIFIER; p.label = 1; d = &dm_nograd;
          break;
        case 13:
          p.guidance = DF_GUIDANCE_FREE; p.label = 1; p.scale = NAN;
          break;
        case 14: p.sampler = (DfSamplerKind) 5; break;
        case 15: p.spacing = (DfSpacing) 5; break;
        case 16: p.guidance = (DfGuidance) 5; break;
        case 17: p.guide_lo = -1; break;
        case 18: p.guide_lo = 2; p.guide_hi = 2; break;
        case 19: p.guide_hi = NAN; break;
        case 20: p.guide_lo = INFINITY; break;
        }
      g_assert_false (df_sample_params_check (&p, s, d, &error));
      g_assert_error (error, DF_SAMPLER_ERROR, DF_SAMPLER_ERROR_INVALID);
      g_test_message ("case %d: %s", c, error->message);
      g_clear_error (&error);

      gauss.eps_calls = mix.eps_calls = 0;
      g_assert_false (df_sample (s, d, &p, 0, 1, NULL, out, NULL, NULL, NULL,
                                 &error));
      g_assert_error (error, DF_SAMPLER_ERROR, DF_SAMPLER_ERROR_INVALID);
      g_clear_error (&error);
      g_assert_cmpint (gauss.eps_calls + mix.eps_calls, ==, 0);
    }

  /* And what is fine: an unconditional model with classifier guidance. */
  {
    DfSampleParams p;
    DfDenoiser d = dg;
    GError *error = NULL;

    df_sample_params_init (&p);
    p.clip_x0 = FALSE;          /* the oracles' data is not bounded */
    d.class_grad = oracle_grad;
    p.guidance = DF_GUIDANCE_CLASSIFIER;
    p.label = 1;
    g_assert_true (df_sample_params_check (&p, s, &d, &error));
    g_assert_no_error (error);
  }
  df_schedule_free (s);
}

/* ---- Slerp --------------------------------------------------------------- */

static void
test_slerp (void)
{
  const gsize n = 1000;
  float *a = g_new (float, n), *b = g_new (float, n), *out = g_new (float, n);
  double na = 0, nb = 0, no = 0, worst = 0;

  df_rng_normal (1, 0, DF_RNG_STEP_INIT, a, n);
  df_rng_normal (2, 0, DF_RNG_STEP_INIT, b, n);

  /* The ends are copies. */
  df_slerp (a, b, n, 0.0, out);
  assert_same_bits (out, a, n);
  df_slerp (a, b, n, 1.0, out);
  assert_same_bits (out, b, n);

  /* Two near-orthogonal noises: the midpoint keeps the norm (a line would
   * shrink it by ~ 1/sqrt(2)). */
  df_slerp (a, b, n, 0.5, out);
  for (gsize i = 0; i < n; i++)
    {
      na += (double) a[i] * a[i];
      nb += (double) b[i] * b[i];
      no += (double) out[i] * out[i];
    }
  g_test_message ("norms %.3f %.3f, midpoint %.3f", sqrt (na), sqrt (nb),
                  sqrt (no));
  g_assert_cmpfloat (fabs (sqrt (no) - 0.5 * (sqrt (na) + sqrt (nb))), <,
                     0.05 * sqrt (na));

  /* Equal and nearly parallel noises: finite, on the line between them. */
  df_slerp (a, a, n, 0.3, out);
  for (gsize i = 0; i < n; i++)
    worst = MAX (worst, fabs (out[i] - a[i]));
  g_assert_cmpfloat (worst, <, 1e-6);
  memcpy (b, a, n * sizeof (float));
  b[0] += 1e-4f;
  df_slerp (a, b, n, 0.7, out);
  for (gsize i = 0; i < n; i++)
    {
      g_assert_true (isfinite (out[i]));
      g_assert_cmpfloat (fabs (out[i] - (0.3 * a[i] + 0.7 * b[i])), <, 1e-6);
    }

  /* Opposite noises and a zero noise: finite. */
  for (gsize i = 0; i < n; i++)
    b[i] = -a[i];
  df_slerp (a, b, n, 0.5, out);
  for (gsize i = 0; i < n; i++)
    g_assert_true (isfinite (out[i]));
  memset (b, 0, n * sizeof (float));
  df_slerp (a, b, n, 0.5, out);
  for (gsize i = 0; i < n; i++)
    g_assert_true (isfinite (out[i]));
  g_free (a);
  g_free (b);
  g_free (out);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/engine/sampler/gaussian-ddpm", test_gaussian_ddpm);
  g_test_add_func ("/engine/sampler/gaussian-ddpm-fixed-large",
                   test_gaussian_ddpm_large);
  g_test_add_func ("/engine/sampler/gaussian-ddpm-strided",
                   test_gaussian_ddpm_strided);
  g_test_add_func ("/engine/sampler/gaussian-ddim-eta0",
                   test_gaussian_ddim_eta0);
  g_test_add_func ("/engine/sampler/gaussian-ddim-eta1",
                   test_gaussian_ddim_eta1);
  g_test_add_func ("/engine/sampler/ddim-eta1-is-ddpm",
                   test_ddim_eta1_is_ddpm);
  g_test_add_func ("/engine/sampler/ddim-eta0-deterministic",
                   test_ddim_deterministic);
  g_test_add_func ("/engine/sampler/noise-keys", test_noise_keys);
  g_test_add_func ("/engine/sampler/batch-invariance", test_batch_invariance);
  g_test_add_func ("/engine/sampler/threaded-batch", test_threaded_batch);
  g_test_add_func ("/engine/sampler/free-guidance-scale-one",
                   test_free_scale_one);
  g_test_add_func ("/engine/sampler/free-guidance-scale-zero",
                   test_free_scale_zero);
  g_test_add_func ("/engine/sampler/classifier-guidance-shifts",
                   test_classifier_shifts);
  g_test_add_func ("/engine/sampler/classifier-guidance-exact",
                   test_classifier_exact);
  g_test_add_func ("/engine/sampler/guidance-interval",
                   test_guidance_interval);
  g_test_add_func ("/engine/sampler/one-step-by-hand", test_one_step_by_hand);
  g_test_add_func ("/engine/sampler/clip", test_clip);
  g_test_add_func ("/engine/sampler/progress", test_progress);
  g_test_add_func ("/engine/sampler/cancel", test_cancel);
  g_test_add_func ("/engine/sampler/bad-params", test_bad_params);
  g_test_add_func ("/engine/sampler/slerp", test_slerp);
  return g_test_run ();
}
