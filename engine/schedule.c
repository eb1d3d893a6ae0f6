/* schedule.c: beta schedules and timestep spacings (see schedule.h).
 *
 * Legend: T training timesteps, S sampling steps.  All in double.
 */
#include "schedule.h"

#include <math.h>
#include <string.h>

G_DEFINE_QUARK (df-schedule-error-quark, df_schedule_error)

/* More than any model trains with; keeps T * sizeof (double) sane. */
#define DF_SCHEDULE_MAX_T 100000

/* numpy.linspace (start, stop, n) as numpy computes it: i * step + start,
 * with the last entry set to stop exactly. */
static void
linspace (double start, double stop, int n, double *out)
{
  double step;

  if (n == 1)
    {
      out[0] = start;
      return;
    }
  step = (stop - start) / (n - 1);
  for (int i = 0; i < n; i++)
    out[i] = i * step + start;
  out[n - 1] = stop;
}

/* Nichol & Dhariwal's alpha bar at t in [0, 1]. */
static double
cosine_alpha_bar (double t)
{
  double c = cos ((t + 0.008) / 1.008 * G_PI / 2);

  return c * c;
}

DfSchedule *
df_schedule_new (DfBetaSchedule kind, int T, double beta_start,
                 double beta_end, GError **error)
{
  DfSchedule *s;
  double prod;

  if (T < 1 || T > DF_SCHEDULE_MAX_T)
    {
      g_set_error (error, DF_SCHEDULE_ERROR, DF_SCHEDULE_ERROR_INVALID,
                   "num_train_timesteps %d is out of range: it must be in "
                   "1..%d", T, DF_SCHEDULE_MAX_T);
      return NULL;
    }
  if (kind != DF_BETA_LINEAR && kind != DF_BETA_SCALED_LINEAR
      && kind != DF_BETA_COSINE)
    {
      g_set_error (error, DF_SCHEDULE_ERROR, DF_SCHEDULE_ERROR_INVALID,
                   "unknown beta schedule %d: use linear, scaled_linear or "
                   "squaredcos_cap_v2", (int) kind);
      return NULL;
    }

  if (!isfinite (beta_start) || !isfinite (beta_end))
    {
      g_set_error (error, DF_SCHEDULE_ERROR, DF_SCHEDULE_ERROR_INVALID,
                   "beta_start %g, beta_end %g: betas must be finite "
                   "numbers (0 or less takes the defaults)", beta_start,
                   beta_end);
      return NULL;
    }

  s = g_new0 (DfSchedule, 1);
  s->kind = kind;
  s->T = T;
  s->betas = g_new (double, T);
  s->alphas_cumprod = g_new (double, T);

  /* The betas of the kind. */
  switch (kind)
    {
    case DF_BETA_LINEAR:
      {
        /* improved-diffusion's "linear": the T = 1000 range scaled so that
         * any T spans the same total noise. */
        double scale = 1000.0 / T;

        s->beta_start = beta_start > 0 ? beta_start : 1e-4;
        s->beta_end = beta_end > 0 ? beta_end : 0.02;
        linspace (scale * s->beta_start, scale * s->beta_end, T, s->betas);
        break;
      }
    case DF_BETA_SCALED_LINEAR:
      s->beta_start = beta_start > 0 ? beta_start : 0.00085;
      s->beta_end = beta_end > 0 ? beta_end : 0.012;
      linspace (sqrt (s->beta_start), sqrt (s->beta_end), T, s->betas);
      for (int t = 0; t < T; t++)
        s->betas[t] *= s->betas[t];
      break;
    case DF_BETA_COSINE:
      for (int t = 0; t < T; t++)
        {
          double b = 1 - cosine_alpha_bar ((t + 1.0) / T)
                         / cosine_alpha_bar ((double) t / T);

          s->betas[t] = MIN (b, 0.999);
        }
      break;
    }

  /* Every beta must leave a positive alpha, or ab_t reaches 0 and the
   * sampler divides by it. */
  for (int t = 0; t < T; t++)
    if (!(s->betas[t] > 0 && s->betas[t] < 1))
      {
        g_set_error (error, DF_SCHEDULE_ERROR, DF_SCHEDULE_ERROR_INVALID,
                     "%s schedule with T = %d, beta_start %g, beta_end %g "
                     "gives beta[%d] = %g, outside (0, 1): use more "
                     "timesteps or smaller betas",
                     df_beta_schedule_name (kind), T, s->beta_start,
                     s->beta_end, t, s->betas[t]);
        df_schedule_free (s);
        return NULL;
      }

  /* ab_t = prod_{i <= t} (1 - beta_i), in order as numpy.cumprod. */
  prod = 1.0;
  for (int t = 0; t < T; t++)
    {
      prod *= 1.0 - s->betas[t];
      s->alphas_cumprod[t] = prod;
    }
  return s;
}

void
df_schedule_free (DfSchedule *s)
{
  if (s == NULL)
    return;
  g_free (s->betas);
  g_free (s->alphas_cumprod);
  g_free (s);
}

gboolean
df_schedule_timesteps (const DfSchedule *s, int steps, DfSpacing spacing,
                       int *out, GError **error)
{
  int T, S;

  g_return_val_if_fail (s != NULL, FALSE);
  g_return_val_if_fail (out != NULL, FALSE);

  T = s->T;
  S = steps;
  if (S < 1 || S > T)
    {
      g_set_error (error, DF_SCHEDULE_ERROR, DF_SCHEDULE_ERROR_INVALID,
                   "%d sampling steps: the model was trained with %d "
                   "timesteps, so steps must be in 1..%d", S, T, T);
      return FALSE;
    }

  /* The list by diffusers' formula, t_0 the largest. */
  switch (spacing)
    {
    case DF_SPACING_LEADING:
      for (int i = 0; i < S; i++)
        out[i] = (S - 1 - i) * (T / S);
      break;
    case DF_SPACING_TRAILING:
      {
        /* numpy.arange (T, 0, -T/S) fills start + i * delta, where delta
         * is recomputed as (start + step) - start; rint is numpy's
         * round-half-to-even.  Only the first S are taken: numpy's length,
         * ceil (T / (T/S)), is S + 1 for some S (the extra entry -1). */
        double start = T;
        double delta = (start + (-(double) T / S)) - start;

        for (int i = 0; i < S; i++)
          out[i] = (int) rint (start + i * delta) - 1;
        break;
      }
    case DF_SPACING_LINSPACE:
      {
        double *v = g_new (double, S);

        linspace (0, T - 1, S, v);
        for (int i = 0; i < S; i++)
          out[i] = (int) rint (v[S - 1 - i]);
        g_free (v);
        break;
      }
    default:
      g_set_error (error, DF_SCHEDULE_ERROR, DF_SCHEDULE_ERROR_INVALID,
                   "unknown timestep spacing %d: use leading, trailing or "
                   "linspace", (int) spacing);
      return FALSE;
    }

  /* Repair, should rounding ever collide or leave the range: clamp, make
   * strictly descending from the bottom up, then from the top down.  With
   * S <= T both passes together always end inside [0, T-1]. */
  for (int i = 0; i < S; i++)
    out[i] = CLAMP (out[i], 0, T - 1);
  for (int i = S - 2; i >= 0; i--)
    if (out[i] <= out[i + 1])
      out[i] = out[i + 1] + 1;
  if (out[0] > T - 1)
    out[0] = T - 1;
  for (int i = 1; i < S; i++)
    if (out[i] >= out[i - 1])
      out[i] = out[i - 1] - 1;
  return TRUE;
}

static const char *const beta_names[] = {
  [DF_BETA_LINEAR] = "linear",
  [DF_BETA_SCALED_LINEAR] = "scaled_linear",
  [DF_BETA_COSINE] = "squaredcos_cap_v2",
};

static const char *const spacing_names[] = {
  [DF_SPACING_LEADING] = "leading",
  [DF_SPACING_TRAILING] = "trailing",
  [DF_SPACING_LINSPACE] = "linspace",
};

const char *
df_beta_schedule_name (DfBetaSchedule kind)
{
  if ((unsigned) kind >= G_N_ELEMENTS (beta_names))
    return "unknown";
  return beta_names[kind];
}

gboolean
df_beta_schedule_parse (const char *name, DfBetaSchedule *out)
{
  g_return_val_if_fail (name != NULL, FALSE);

  for (unsigned i = 0; i < G_N_ELEMENTS (beta_names); i++)
    if (g_ascii_strcasecmp (name, beta_names[i]) == 0)
      {
        if (out)
          *out = (DfBetaSchedule) i;
        return TRUE;
      }
  if (g_ascii_strcasecmp (name, "cosine") == 0)
    {
      if (out)
        *out = DF_BETA_COSINE;
      return TRUE;
    }
  return FALSE;
}

const char *
df_spacing_name (DfSpacing spacing)
{
  if ((unsigned) spacing >= G_N_ELEMENTS (spacing_names))
    return "unknown";
  return spacing_names[spacing];
}

gboolean
df_spacing_parse (const char *name, DfSpacing *out)
{
  g_return_val_if_fail (name != NULL, FALSE);

  for (unsigned i = 0; i < G_N_ELEMENTS (spacing_names); i++)
    if (g_ascii_strcasecmp (name, spacing_names[i]) == 0)
      {
        if (out)
          *out = (DfSpacing) i;
        return TRUE;
      }
  return FALSE;
}
