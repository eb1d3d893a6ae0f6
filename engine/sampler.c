/* sampler.c: DDIM and DDPM over a noise predictor (see sampler.h).
 *
 * Legend: N samples, P = C*H*W values a sample, S steps; t the current
 * timestep, s the next one ("final": ab = 1, or ab_0).  Arithmetic on the
 * values is per element in double, so a sample does not depend on the batch
 * or the thread count.
 */
#include "sampler.h"

#include <math.h>
#include <string.h>

#include "rng.h"

/* Below this many values a step's parallel region costs more than the
 * arithmetic (and idles badly on a loaded machine). */
#define PAR_MIN_VALUES 65536

G_DEFINE_QUARK (df-sampler-error-quark, df_sampler_error)

void
df_sample_params_init (DfSampleParams *p)
{
  g_return_if_fail (p != NULL);

  memset (p, 0, sizeof *p);
  p->sampler = DF_SAMPLER_DDIM;
  p->steps = 50;
  p->eta = 0.0;
  p->spacing = DF_SPACING_LEADING;
  p->variance = DF_VARIANCE_FIXED_SMALL;
  p->clip_x0 = TRUE;
  p->final_alpha_one = TRUE;
  p->seed = 0;
  p->label = -1;
  p->guidance = DF_GUIDANCE_NONE;
  p->scale = 1.0;
  p->guide_lo = 0.0;
  p->guide_hi = INFINITY;
}

#define INVALID(...) \
  G_STMT_START { \
    g_set_error (error, DF_SAMPLER_ERROR, DF_SAMPLER_ERROR_INVALID, \
                 __VA_ARGS__); \
    return FALSE; \
  } G_STMT_END

gboolean
df_sample_params_check (const DfSampleParams *p, const DfSchedule *s,
                        const DfDenoiser *d, GError **error)
{
  g_return_val_if_fail (p != NULL, FALSE);
  g_return_val_if_fail (s != NULL, FALSE);
  g_return_val_if_fail (d != NULL && d->eps != NULL, FALSE);
  g_return_val_if_fail (d->channels > 0 && d->height > 0 && d->width > 0,
                        FALSE);

  /* Enumerations a front end may have parsed from the user. */
  if (p->sampler != DF_SAMPLER_DDIM && p->sampler != DF_SAMPLER_DDPM)
    INVALID ("unknown sampler %d: use ddim or ddpm", (int) p->sampler);
  if (p->spacing != DF_SPACING_LEADING && p->spacing != DF_SPACING_TRAILING
      && p->spacing != DF_SPACING_LINSPACE)
    INVALID ("unknown timestep spacing %d: use leading, trailing or "
             "linspace", (int) p->spacing);
  if (p->variance != DF_VARIANCE_FIXED_SMALL
      && p->variance != DF_VARIANCE_FIXED_LARGE)
    INVALID ("unknown DDPM variance %d: use fixed_small or fixed_large",
             (int) p->variance);
  if (p->guidance != DF_GUIDANCE_NONE && p->guidance != DF_GUIDANCE_FREE
      && p->guidance != DF_GUIDANCE_CLASSIFIER)
    INVALID ("unknown guidance %d: use none, free or classifier",
             (int) p->guidance);

  /* Numbers. */
  if (p->steps < 1 || p->steps > s->T)
    INVALID ("%d sampling steps: the model was trained with %d timesteps, "
             "so steps must be in 1..%d", p->steps, s->T, s->T);
  if (!isfinite (p->eta) || p->eta < 0)
    INVALID ("eta %g: it must be a finite number >= 0 (0 is deterministic "
             "DDIM, 1 is DDPM-like)", p->eta);
  if (!isfinite (p->scale))
    INVALID ("guidance scale %g: it must be a finite number", p->scale);
  if (isnan (p->guide_lo) || isnan (p->guide_hi) || p->guide_lo < 0
      || isinf (p->guide_lo) || p->guide_hi <= p->guide_lo)
    INVALID ("guidance interval (%g, %g]: it must be noise levels with "
             "0 <= low < high (high may be inf)", p->guide_lo, p->guide_hi);

  /* The label against the model's classes.  An unconditional model under
   * classifier guidance takes any label >= 0: the classifier checks it. */
  if (p->label < -1)
    INVALID ("label %d: use a class in 0..%d, or -1 for none", p->label,
             MAX (d->num_classes - 1, 0));
  if (p->label >= 0 && d->num_classes > 0 && p->label >= d->num_classes)
    INVALID ("label %d: the model has %d classes, use 0..%d or -1 for none",
             p->label, d->num_classes, d->num_classes - 1);
  if (p->label >= 0 && d->num_classes == 0
      && p->guidance != DF_GUIDANCE_CLASSIFIER)
    INVALID ("label %d: the model is unconditional; drop the label or use "
             "classifier guidance", p->label);

  /* What each guidance needs. */
  if (p->guidance == DF_GUIDANCE_FREE)
    {
      if (p->label < 0)
        INVALID ("classifier-free guidance needs a label: choose a class");
      if (d->num_classes == 0 || d->uncond_label < 0)
        INVALID ("classifier-free guidance needs a model trained with an "
                 "unconditional class; this one has none: use guidance "
                 "none");
    }
  if (p->guidance == DF_GUIDANCE_CLASSIFIER)
    {
      if (p->label < 0)
        INVALID ("classifier guidance needs a label: choose a class");
      if (d->class_grad == NULL)
        INVALID ("classifier guidance needs a classifier model: give one "
                 "or use guidance none");
    }
  return TRUE;
}

#undef INVALID

/* Whether timestep t's noise level is in p's guidance interval. */
static gboolean
guided_at (const DfSchedule *s, const DfSampleParams *p, int t)
{
  double ab = s->alphas_cumprod[t], noise = sqrt ((1 - ab) / ab);

  return noise > p->guide_lo && noise <= p->guide_hi;
}

int
df_sample_guided_steps (const DfSchedule *s, const DfSampleParams *p)
{
  int *ts, n = 0;

  g_return_val_if_fail (s != NULL && p != NULL, -1);
  if (p->steps < 1 || p->steps > s->T)
    return -1;
  ts = g_new (int, p->steps);
  if (!df_schedule_timesteps (s, p->steps, p->spacing, ts, NULL))
    n = -1;
  else
    for (int k = 0; k < p->steps; k++)
      n += guided_at (s, p, ts[k]);
  g_free (ts);
  return n;
}

void
df_sample_initial_noise (guint64 seed, guint64 index, int size, float *out)
{
  g_return_if_fail (size >= 0);
  df_rng_normal (seed, index, DF_RNG_STEP_INIT, out, (gsize) size);
}

/* Work buffers of one df_sample call. */
typedef struct {
  int    *timesteps;   /* [S] */
  int    *labels;      /* [2N] */
  float  *x_in;        /* [2N,P], free guidance only */
  float  *eps;         /* [2N,P] */
  float  *grad;        /* [N,P], classifier guidance only */
  float  *x0;          /* [N,P] */
  float  *z;           /* [N,P] */
} Work;

static void
work_clear (Work *w)
{
  g_free (w->timesteps);
  g_free (w->labels);
  g_free (w->x_in);
  g_free (w->eps);
  g_free (w->grad);
  g_free (w->x0);
  g_free (w->z);
}

static gboolean
call_failed (GError *local, const char *what, int t, GError **error)
{
  if (local == NULL)
    g_set_error (&local, DF_SAMPLER_ERROR, DF_SAMPLER_ERROR_INVALID,
                 "the %s failed at timestep %d without saying why", what, t);
  g_propagate_error (error, local);
  return FALSE;
}

/* eps[N,P] for x[N,P] at t, free guidance at this step's scale folded in
 * (the classifier's is not). */
static gboolean
predict_eps (const DfDenoiser *d, const DfSampleParams *p, double scale,
             Work *w, const float *x, int n, gsize P, int t, GError **error)
{
  GError *local = NULL;
  const int *labels = NULL;
  gsize np = (gsize) n * P;

  /* Free guidance at a general scale: one call on [x; x] with the labels
   * then the unconditional one, combined per element. */
  if (p->guidance == DF_GUIDANCE_FREE && scale != 1.0 && scale != 0.0)
    {
      double sc = scale;

      memcpy (w->x_in, x, np * sizeof (float));
      memcpy (w->x_in + np, x, np * sizeof (float));
      for (int i = 0; i < n; i++)
        {
          w->labels[i] = p->label;
          w->labels[n + i] = d->uncond_label;
        }
      if (!d->eps (d->eps_data, w->x_in, 2 * n, t, w->labels, w->eps,
                   &local))
        return call_failed (local, "noise predictor", t, error);

      /* eps[0..np) conditional, eps[np..2np) unconditional; elementwise,
       * too cheap for threads. */
      for (gsize j = 0; j < np; j++)
        {
          double c = w->eps[j], u = w->eps[np + j];

          w->eps[j] = (float) (u + sc * (c - u));
        }
      return TRUE;
    }

  /* One call on n: scale 1 is the conditional prediction exactly, scale 0
   * the unconditional one; otherwise the label, if any, as given. */
  if (p->guidance == DF_GUIDANCE_FREE)
    {
      int label = scale == 1.0 ? p->label : d->uncond_label;

      for (int i = 0; i < n; i++)
        w->labels[i] = label;
      labels = w->labels;
    }
  else if (p->label >= 0 && d->num_classes > 0)
    {
      for (int i = 0; i < n; i++)
        w->labels[i] = p->label;
      labels = w->labels;
    }
  if (!d->eps (d->eps_data, x, n, t, labels, w->eps, &local))
    return call_failed (local, "noise predictor", t, error);
  return TRUE;
}

/* One step's coefficients (see df_sample) and where it works. */
typedef struct {
  const DfSampleParams *p;
  Work    *w;
  float   *x;                  /* [N,P] */
  guint64  first;
  guint32  k;
  gsize    P;
  double   scale;              /* this step's guidance scale */
  gboolean grad;               /* w->grad holds the classifier's gradient */
  double   sa_t, sb_t;         /* sqrt (ab_t), sqrt (1 - ab_t) */
  double   c_x0, c_xt, c_eps, sigma;
} Step;

/* Sample i's step from t to s, in place in x. */
static void
step_sample (const Step *st, int i)
{
  const DfSampleParams *p = st->p;
  gsize P = st->P;
  float *xi = st->x + i * P, *x0i = st->w->x0 + i * P;
  float *zi = st->w->z + i * P;
  const float *ei = st->w->eps + i * P;
  const float *gi = st->grad ? st->w->grad + i * P : NULL;
  gboolean ddim = p->sampler == DF_SAMPLER_DDIM;
  double scale = st->scale, sa_t = st->sa_t, sb_t = st->sb_t;

  if (st->sigma > 0)
    df_rng_normal (p->seed, st->first + i, st->k, zi, P);

  for (gsize j = 0; j < P; j++)
    {
      double xt = xi[j], e = ei[j], x0, xs;

      /* Classifier guidance on eps, DDIM's way. */
      if (gi != NULL && ddim)
        e -= scale * sb_t * gi[j];

      /* Predicted x0; after a clip eps is the one that x0 implies, as
       * diffusers recomputes it. */
      x0 = (xt - sb_t * e) / sa_t;
      if (p->clip_x0 && (x0 < -1 || x0 > 1))
        {
          x0 = CLAMP (x0, -1.0, 1.0);
          e = (xt - sa_t * x0) / sb_t;
        }

      if (ddim)
        xs = st->c_x0 * x0 + st->c_eps * e;
      else
        {
          xs = st->c_x0 * x0 + st->c_xt * xt;
          if (gi != NULL)
            xs += st->c_eps * gi[j];
        }
      if (st->sigma > 0)
        xs += st->sigma * zi[j];

      x0i[j] = (float) x0;
      xi[j] = (float) xs;
    }
}

gboolean
df_sample (const DfSchedule *s, const DfDenoiser *d,
           const DfSampleParams *p, guint64 first, int n,
           const float *x_T, float *out,
           DfProgressFunc progress, gpointer progress_data,
           GCancellable *cancellable, GError **error)
{
  Work w = { 0 };
  gsize P, np;
  int S;
  float *x = out;                           /* [N,P], the chain's state */
  gboolean ok = FALSE;

  g_return_val_if_fail (s != NULL && d != NULL && p != NULL, FALSE);
  g_return_val_if_fail (n >= 1, FALSE);
  g_return_val_if_fail (out != NULL, FALSE);

  if (!df_sample_params_check (p, s, d, error))
    return FALSE;

  P = (gsize) d->channels * d->height * d->width;
  np = (gsize) n * P;
  S = p->steps;

  /* The timesteps, t_0 the noisiest. */
  w.timesteps = g_new (int, S);
  if (!df_schedule_timesteps (s, S, p->spacing, w.timesteps, error))
    goto out;

  /* Buffers: twice the batch when free guidance runs both halves. */
  w.labels = g_new (int, 2 * (gsize) n);
  w.eps = g_new (float, (p->guidance == DF_GUIDANCE_FREE ? 2 : 1) * np);
  w.x0 = g_new (float, np);
  w.z = g_new (float, np);
  if (p->guidance == DF_GUIDANCE_FREE)
    w.x_in = g_new (float, 2 * np);
  if (p->guidance == DF_GUIDANCE_CLASSIFIER)
    w.grad = g_new (float, np);

  /* x_T: given, or each sample's own initial noise. */
  if (x_T != NULL)
    memmove (x, x_T, np * sizeof (float));
  else
    for (int i = 0; i < n; i++)
      df_sample_initial_noise (p->seed, first + i, (int) P, x + i * P);

  for (int k = 0; k < S; k++)
    {
      int t = w.timesteps[k];
      gboolean last = k == S - 1;
      double ab_t = s->alphas_cumprod[t];
      double ab_s = !last ? s->alphas_cumprod[w.timesteps[k + 1]]
                          : p->final_alpha_one ? 1.0
                          : s->alphas_cumprod[0];
      double sa_t = sqrt (ab_t), sb_t = sqrt (1 - ab_t), sa_s = sqrt (ab_s);
      gboolean guided = guided_at (s, p, t);
      gboolean classifier = p->guidance == DF_GUIDANCE_CLASSIFIER;
      /* Outside the interval: free guidance conditional, classifier none. */
      double scale = guided ? p->scale : classifier ? 0.0 : 1.0;
      double c_x0 = 0, c_xt = 0, c_eps = 0, sigma = 0;

      if (g_cancellable_set_error_if_cancelled (cancellable, error))
        goto out;

      /* eps (and the classifier's gradient) at x_t. */
      if (!predict_eps (d, p, scale, &w, x, n, P, t, error))
        goto out;
      if (classifier && guided)
        {
          GError *local = NULL;

          for (int i = 0; i < n; i++)
            w.labels[i] = p->label;
          if (!d->class_grad (d->grad_data, x, n, t, w.labels, w.grad,
                              &local))
            {
              call_failed (local, "classifier", t, error);
              goto out;
            }
        }

      /* The step's coefficients.  DDIM: x_s = sa_s x0 + c_eps eps + sigma z,
       * with c_eps clamped at 0 for eta > 1 where sigma^2 would exceed
       * 1 - ab_s.  DDPM: the posterior mean c_x0 x0 + c_xt x_t of
       * q(x_s | x_t, x0) with the strided beta = 1 - ab_t / ab_s, plus
       * sqrt (variance) z except on the last step. */
      if (p->sampler == DF_SAMPLER_DDIM)
        {
          double var = p->eta * p->eta * (1 - ab_s) / (1 - ab_t)
                       * (1 - ab_t / ab_s);

          var = MAX (var, 0.0);
          sigma = sqrt (var);
          c_x0 = sa_s;
          c_eps = sqrt (MAX (1 - ab_s - var, 0.0));
        }
      else
        {
          double alpha = ab_t / ab_s, beta = 1 - alpha;
          double var = p->variance == DF_VARIANCE_FIXED_LARGE
                       ? beta : beta * (1 - ab_s) / (1 - ab_t);

          c_x0 = sa_s * beta / (1 - ab_t);
          c_xt = sqrt (alpha) * (1 - ab_s) / (1 - ab_t);
          /* Here c_eps carries the classifier's mean shift s * variance. */
          c_eps = scale * var;
          sigma = last ? 0.0 : sqrt (var);
        }

      /* Per sample: its own noise, then the update in double. */
      {
        Step st = { .p = p, .w = &w, .x = x, .first = first,
                    .k = (guint32) k, .P = P, .scale = scale,
                    .grad = classifier && guided, .sa_t = sa_t, .sb_t = sb_t,
                    .c_x0 = c_x0, .c_xt = c_xt, .c_eps = c_eps,
                    .sigma = sigma };

        if (np >= PAR_MIN_VALUES)
          {
#pragma omp parallel for schedule(static)
            for (int i = 0; i < n; i++)
              step_sample (&st, i);
          }
        else
          for (int i = 0; i < n; i++)
            step_sample (&st, i);
      }

      if (progress != NULL)
        progress (progress_data, k + 1, S, w.x0, n);
    }
  ok = TRUE;

out:
  work_clear (&w);
  return ok;
}

void
df_slerp (const float *x0, const float *x1, gsize n, double a, float *out)
{
  double dot = 0, n0 = 0, n1 = 0, cosang, theta, sn, w0, w1;

  g_return_if_fail ((x0 != NULL && x1 != NULL && out != NULL) || n == 0);

  /* The ends exactly. */
  if (a == 0.0)
    {
      memmove (out, x0, n * sizeof (float));
      return;
    }
  if (a == 1.0)
    {
      memmove (out, x1, n * sizeof (float));
      return;
    }

  /* The angle, in one sequential sum so it never depends on threads. */
  for (gsize i = 0; i < n; i++)
    {
      dot += (double) x0[i] * x1[i];
      n0 += (double) x0[i] * x0[i];
      n1 += (double) x1[i] * x1[i];
    }
  cosang = n0 > 0 && n1 > 0 ? dot / sqrt (n0 * n1) : 1.0;
  cosang = CLAMP (cosang, -1.0, 1.0);
  theta = acos (cosang);
  sn = sin (theta);

  /* Nearly parallel (or opposite, or a zero vector): sin (theta) is too
   * small to divide by, and the arc is a line anyway. */
  if (fabs (cosang) > 0.9995 || sn < 1e-6)
    {
      w0 = 1 - a;
      w1 = a;
    }
  else
    {
      w0 = sin ((1 - a) * theta) / sn;
      w1 = sin (a * theta) / sn;
    }
  for (gsize i = 0; i < n; i++)
    out[i] = (float) (w0 * x0[i] + w1 * x1[i]);
}
