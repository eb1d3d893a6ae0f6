/* test-schedule.c: beta schedules and timestep spacings against numpy. */
#include <math.h>

#include "schedule.h"

/* Reference betas and alphas_cumprod, float64, made by
 *   /usr/bin/python3 -c '
 *   import numpy as np, math
 *   lin = lambda T: np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
 *   slin = lambda T: np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2
 *   f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
 *   cos = lambda T: np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999)
 *                             for i in range(T)])
 *   for b, ii in ((lin(1000), [0, 1, 499, 998, 999]),
 *                 (lin(250), [0, 1, 124, 248, 249]),
 *                 (slin(1000), [0, 1, 499, 998, 999]),
 *                 (cos(1000), [0, 1, 499, 998, 999])):
 *       ab = np.cumprod(1 - b)
 *       print(ii, ["%.17g" % b[i] for i in ii], ["%.17g" % ab[i] for i in ii])'
 */
typedef struct {
  DfBetaSchedule kind;
  int            T;
  int            t[5];
  double         beta[5];
  double         ab[5];
} RefSchedule;

static const RefSchedule ref_schedules[] = {
  { DF_BETA_LINEAR, 1000, { 0, 1, 499, 998, 999 },
    { 0.0001, 0.00011991991991991993, 0.010040040040040039,
      0.019980080080080079, 0.02 },
    { 0.99990000000000001, 0.99978009207207208, 0.078587242881778235,
      4.118193638138445e-05, 4.0358297653756761e-05 } },
  { DF_BETA_LINEAR, 250, { 0, 1, 124, 248, 249 },
    { 0.00040000000000000002, 0.00071967871485943778, 0.04004016064257028,
      0.079680321285140562, 0.080000000000000002 },
    { 0.99960000000000004, 0.99888060915662658, 0.077144346740002145,
      3.5482707994464403e-05, 3.2644091354907249e-05 } },
  { DF_BETA_SCALED_LINEAR, 1000, { 0, 1, 499, 998, 999 },
    { 0.00084999999999999995, 0.00085469865540568619, 0.0048037929805507173,
      0.011982376333083366, 0.012 },
    { 0.99914999999999998, 0.99829602783845139, 0.27766965045646763,
      0.0047166988998757478, 0.0046600985130772384 } },
  { DF_BETA_COSINE, 1000, { 0, 1, 499, 998, 999 },
    { 4.128422482196914e-05, 4.6141752736650332e-05, 0.0031458862304780677,
      0.74999939290111661, 0.999 },
    { 0.99995871577517803, 0.99991257592736782, 0.49384359044063819,
      2.4287669070348544e-06, 2.4287669070348567e-09 } },
};

/* diffusers' DDIMScheduler.set_timesteps lists (steps_offset 0), made by
 *   /usr/bin/python3 -c '
 *   import numpy as np
 *   for T, S in ((1000, 1), (1000, 7), (1000, 16), (1000, 50), (1000, 61),
 *                (10, 3), (10, 7), (10, 10)):
 *       print((np.arange(0, S) * (T // S)).round()[::-1].astype(np.int64))
 *       print((np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1)[:S])
 *       print(np.linspace(0, T - 1, S).round()[::-1].astype(np.int64))'
 * Trailing keeps the first S: for S = 61 numpy gives 62 entries, the last
 * being -1 (see schedule.h).  S = 7 and 16 hit round-half-to-even ties. */
typedef struct {
  int       T, S;
  DfSpacing spacing;
  int       t[64];
} RefSpacing;

static const RefSpacing ref_spacings[] = {
  { 1000, 1, DF_SPACING_LEADING,
    { 0 } },
  { 1000, 1, DF_SPACING_TRAILING,
    { 999 } },
  { 1000, 1, DF_SPACING_LINSPACE,
    { 0 } },
  { 1000, 7, DF_SPACING_LEADING,
    { 852, 710, 568, 426, 284, 142, 0 } },
  { 1000, 7, DF_SPACING_TRAILING,
    { 999, 856, 713, 570, 428, 285, 142 } },
  { 1000, 7, DF_SPACING_LINSPACE,
    { 999, 832, 666, 500, 333, 166, 0 } },
  { 1000, 16, DF_SPACING_LEADING,
    { 930, 868, 806, 744, 682, 620, 558, 496, 434, 372, 310, 248, 186, 124,
      62, 0 } },
  { 1000, 16, DF_SPACING_TRAILING,
    { 999, 937, 874, 811, 749, 687, 624, 561, 499, 437, 374, 311, 249, 187,
      124, 61 } },
  { 1000, 16, DF_SPACING_LINSPACE,
    { 999, 932, 866, 799, 733, 666, 599, 533, 466, 400, 333, 266, 200, 133,
      67, 0 } },
  { 1000, 50, DF_SPACING_LEADING,
    { 980, 960, 940, 920, 900, 880, 860, 840, 820, 800, 780, 760, 740, 720,
      700, 680, 660, 640, 620, 600, 580, 560, 540, 520, 500, 480, 460, 440,
      420, 400, 380, 360, 340, 320, 300, 280, 260, 240, 220, 200, 180, 160,
      140, 120, 100, 80, 60, 40, 20, 0 } },
  { 1000, 50, DF_SPACING_TRAILING,
    { 999, 979, 959, 939, 919, 899, 879, 859, 839, 819, 799, 779, 759, 739,
      719, 699, 679, 659, 639, 619, 599, 579, 559, 539, 519, 499, 479, 459,
      439, 419, 399, 379, 359, 339, 319, 299, 279, 259, 239, 219, 199, 179,
      159, 139, 119, 99, 79, 59, 39, 19 } },
  { 1000, 50, DF_SPACING_LINSPACE,
    { 999, 979, 958, 938, 917, 897, 877, 856, 836, 816, 795, 775, 754, 734,
      714, 693, 673, 652, 632, 612, 591, 571, 550, 530, 510, 489, 469, 449,
      428, 408, 387, 367, 347, 326, 306, 285, 265, 245, 224, 204, 183, 163,
      143, 122, 102, 82, 61, 41, 20, 0 } },
  { 1000, 61, DF_SPACING_LEADING,
    { 960, 944, 928, 912, 896, 880, 864, 848, 832, 816, 800, 784, 768, 752,
      736, 720, 704, 688, 672, 656, 640, 624, 608, 592, 576, 560, 544, 528,
      512, 496, 480, 464, 448, 432, 416, 400, 384, 368, 352, 336, 320, 304,
      288, 272, 256, 240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80,
      64, 48, 32, 16, 0 } },
  { 1000, 61, DF_SPACING_TRAILING,
    { 999, 983, 966, 950, 933, 917, 901, 884, 868, 851, 835, 819, 802, 786,
      769, 753, 737, 720, 704, 688, 671, 655, 638, 622, 606, 589, 573, 556,
      540, 524, 507, 491, 474, 458, 442, 425, 409, 392, 376, 360, 343, 327,
      310, 294, 278, 261, 245, 229, 212, 196, 179, 163, 147, 130, 114, 97,
      81, 65, 48, 32, 15 } },
  { 1000, 61, DF_SPACING_LINSPACE,
    { 999, 982, 966, 949, 932, 916, 899, 882, 866, 849, 832, 816, 799, 783,
      766, 749, 733, 716, 699, 683, 666, 649, 633, 616, 599, 583, 566, 549,
      533, 516, 499, 483, 466, 450, 433, 416, 400, 383, 366, 350, 333, 316,
      300, 283, 266, 250, 233, 216, 200, 183, 166, 150, 133, 117, 100, 83,
      67, 50, 33, 17, 0 } },
  { 10, 3, DF_SPACING_LEADING,
    { 6, 3, 0 } },
  { 10, 3, DF_SPACING_TRAILING,
    { 9, 6, 2 } },
  { 10, 3, DF_SPACING_LINSPACE,
    { 9, 4, 0 } },
  { 10, 7, DF_SPACING_LEADING,
    { 6, 5, 4, 3, 2, 1, 0 } },
  { 10, 7, DF_SPACING_TRAILING,
    { 9, 8, 6, 5, 3, 2, 0 } },
  { 10, 7, DF_SPACING_LINSPACE,
    { 9, 8, 6, 4, 3, 2, 0 } },
  { 10, 10, DF_SPACING_LEADING,
    { 9, 8, 7, 6, 5, 4, 3, 2, 1, 0 } },
  { 10, 10, DF_SPACING_TRAILING,
    { 9, 8, 7, 6, 5, 4, 3, 2, 1, 0 } },
  { 10, 10, DF_SPACING_LINSPACE,
    { 9, 8, 7, 6, 5, 4, 3, 2, 1, 0 } },
};

static DfSchedule *
schedule_or_die (DfBetaSchedule kind, int T)
{
  GError *error = NULL;
  DfSchedule *s = df_schedule_new (kind, T, 0, 0, &error);

  g_assert_no_error (error);
  g_assert_nonnull (s);
  return s;
}

/* Betas and alphas_cumprod within 1e-12 relative of numpy's float64. */
static void
test_reference_values (void)
{
  double worst = 0;

  for (unsigned r = 0; r < G_N_ELEMENTS (ref_schedules); r++)
    {
      const RefSchedule *ref = &ref_schedules[r];
      DfSchedule *s = schedule_or_die (ref->kind, ref->T);

      g_assert_cmpint (s->T, ==, ref->T);
      for (int i = 0; i < 5; i++)
        {
          int t = ref->t[i];
          double db = fabs (s->betas[t] - ref->beta[i]) / ref->beta[i];
          double da = fabs (s->alphas_cumprod[t] - ref->ab[i]) / ref->ab[i];

          worst = MAX (worst, MAX (db, da));
          g_assert_cmpfloat (db, <, 1e-12);
          g_assert_cmpfloat (da, <, 1e-12);
        }
      df_schedule_free (s);
    }
  g_test_message ("worst relative difference from numpy: %.3g", worst);
}

/* What every schedule must satisfy, and each kind's closed form. */
static void
test_invariants (void)
{
  static const int Ts[] = { 1, 25, 250, 1000, 4000 };
  double worst_cos = 0;

  for (int kind = DF_BETA_LINEAR; kind <= DF_BETA_COSINE; kind++)
    for (unsigned k = 0; k < G_N_ELEMENTS (Ts); k++)
      {
        int T = Ts[k];
        DfSchedule *s = schedule_or_die (kind, T);
        const double *b = s->betas, *ab = s->alphas_cumprod;

        /* ab_t = prod (1 - beta), in (0, 1), strictly decreasing. */
        g_assert_cmpfloat (ab[0], ==, 1 - b[0]);
        for (int t = 0; t < T; t++)
          {
            g_assert_cmpfloat (b[t], >, 0);
            g_assert_cmpfloat (b[t], <=, 0.999);
            g_assert_cmpfloat (ab[t], >, 0);
            g_assert_cmpfloat (ab[t], <, 1);
            if (t > 0)
              {
                g_assert_cmpfloat (ab[t], ==, ab[t - 1] * (1 - b[t]));
                g_assert_cmpfloat (ab[t], <, ab[t - 1]);
              }
          }

        /* linear: evenly spaced from 1e-4 to 0.02, both x 1000/T. */
        if (kind == DF_BETA_LINEAR)
          {
            double sc = 1000.0 / T;

            g_assert_cmpfloat (fabs (b[0] - 1e-4 * sc), <, 1e-15);
            if (T > 1)
              g_assert_cmpfloat (fabs (b[T - 1] - 0.02 * sc), <, 1e-15);
            for (int t = 2; t < T; t++)
              g_assert_cmpfloat (fabs ((b[t] - b[t - 1])
                                       - (b[1] - b[0])), <, 1e-15);
          }

        /* scaled_linear: sqrt (beta) evenly spaced. */
        if (kind == DF_BETA_SCALED_LINEAR)
          {
            g_assert_cmpfloat (fabs (b[0] - 0.00085), <, 1e-15);
            if (T > 1)
              g_assert_cmpfloat (fabs (b[T - 1] - 0.012), <, 1e-15);
            for (int t = 2; t < T; t++)
              g_assert_cmpfloat (fabs ((sqrt (b[t]) - sqrt (b[t - 1]))
                                       - (sqrt (b[1]) - sqrt (b[0]))), <,
                                 1e-14);
          }

        /* cosine: the product telescopes to f ((t+1)/T) / f (0) while no
         * beta is clipped; the last beta is always clipped to 0.999. */
        if (kind == DF_BETA_COSINE)
          {
            double f0 = pow (cos (0.008 / 1.008 * G_PI / 2), 2);

            g_assert_cmpfloat (b[T - 1], ==, 0.999);
            for (int t = 0; t < T - 1; t++)
              {
                double f = pow (cos (((t + 1.0) / T + 0.008) / 1.008
                                     * G_PI / 2), 2);
                double d = fabs (ab[t] - f / f0) / (f / f0);

                if (b[t] >= 0.999)
                  break;
                worst_cos = MAX (worst_cos, d);
                g_assert_cmpfloat (d, <, 1e-9);
              }
          }
        df_schedule_free (s);
      }
  g_test_message ("cosine: worst relative difference from the closed form "
                  "%.3g", worst_cos);
}

/* Defaults for beta_start/end <= 0, given values otherwise. */
static void
test_defaults (void)
{
  GError *error = NULL;
  DfSchedule *s;

  s = df_schedule_new (DF_BETA_SCALED_LINEAR, 1000, -1, 0, &error);
  g_assert_no_error (error);
  g_assert_cmpfloat (s->beta_start, ==, 0.00085);
  g_assert_cmpfloat (s->beta_end, ==, 0.012);
  df_schedule_free (s);

  s = df_schedule_new (DF_BETA_LINEAR, 500, 2e-4, 0.01, &error);
  g_assert_no_error (error);
  g_assert_cmpfloat (s->beta_start, ==, 2e-4);
  g_assert_cmpfloat (s->beta_end, ==, 0.01);
  g_assert_cmpfloat (fabs (s->betas[0] - 4e-4), <, 1e-16);
  g_assert_cmpfloat (fabs (s->betas[499] - 0.02), <, 1e-16);
  df_schedule_free (s);
}

static void
assert_schedule_fails (DfBetaSchedule kind, int T, double b0, double b1)
{
  GError *error = NULL;
  DfSchedule *s = df_schedule_new (kind, T, b0, b1, &error);

  g_assert_null (s);
  g_assert_error (error, DF_SCHEDULE_ERROR, DF_SCHEDULE_ERROR_INVALID);
  g_test_message ("kind %d T %d: %s", kind, T, error->message);
  g_clear_error (&error);
}

/* Impossible schedules are GErrors, not crashes or NaNs. */
static void
test_errors (void)
{
  assert_schedule_fails (DF_BETA_LINEAR, 0, 0, 0);
  assert_schedule_fails (DF_BETA_COSINE, -3, 0, 0);
  /* 0.02 x 1000/10 = 2: a beta above 1. */
  assert_schedule_fails (DF_BETA_LINEAR, 10, 0, 0);
  assert_schedule_fails (DF_BETA_SCALED_LINEAR, 100, 0.001, 1.5);
  assert_schedule_fails (DF_BETA_LINEAR, 1000, NAN, 0.02);
  assert_schedule_fails ((DfBetaSchedule) 7, 1000, 0, 0);
}

static void
assert_valid_list (const int *ts, int S, int T)
{
  for (int i = 0; i < S; i++)
    {
      g_assert_cmpint (ts[i], >=, 0);
      g_assert_cmpint (ts[i], <=, T - 1);
      if (i > 0)
        g_assert_cmpint (ts[i], <, ts[i - 1]);
    }
}

/* S distinct descending timesteps in [0, T-1] for every S and spacing, with
 * each spacing's fixed ends. */
static void
test_spacing_properties (void)
{
  static const int Ts[] = { 1000, 10, 1 };

  for (unsigned k = 0; k < G_N_ELEMENTS (Ts); k++)
    {
      int T = Ts[k];
      DfSchedule *s = schedule_or_die (DF_BETA_COSINE, T);
      int *ts = g_new (int, T + 1);

      for (int sp = DF_SPACING_LEADING; sp <= DF_SPACING_LINSPACE; sp++)
        for (int S = 1; S <= T; S++)
          {
            GError *error = NULL;

            ts[S] = -12345;   /* a sentinel past the end */
            g_assert_true (df_schedule_timesteps (s, S, sp, ts, &error));
            g_assert_no_error (error);
            assert_valid_list (ts, S, T);
            g_assert_cmpint (ts[S], ==, -12345);
            if (sp == DF_SPACING_LEADING || sp == DF_SPACING_LINSPACE)
              g_assert_cmpint (ts[S - 1], ==, 0);
            if (sp == DF_SPACING_TRAILING
                || (sp == DF_SPACING_LINSPACE && S > 1))
              g_assert_cmpint (ts[0], ==, T - 1);
            if (S == T)
              g_assert_cmpint (ts[0], ==, T - 1);
          }
      g_free (ts);
      df_schedule_free (s);
    }
}

/* The exact lists of diffusers' formulas evaluated by numpy. */
static void
test_spacing_reference (void)
{
  for (unsigned r = 0; r < G_N_ELEMENTS (ref_spacings); r++)
    {
      const RefSpacing *ref = &ref_spacings[r];
      DfSchedule *s = schedule_or_die (DF_BETA_COSINE, ref->T);
      int ts[64];
      GError *error = NULL;

      g_assert_true (df_schedule_timesteps (s, ref->S, ref->spacing, ts,
                                            &error));
      g_assert_no_error (error);
      for (int i = 0; i < ref->S; i++)
        {
          if (ts[i] != ref->t[i])
            g_test_message ("T %d S %d %s: entry %d is %d, numpy %d", ref->T,
                            ref->S, df_spacing_name (ref->spacing), i, ts[i],
                            ref->t[i]);
          g_assert_cmpint (ts[i], ==, ref->t[i]);
        }
      df_schedule_free (s);
    }
}

/* Step counts outside 1..T and unknown spacings are GErrors. */
static void
test_spacing_errors (void)
{
  DfSchedule *s = schedule_or_die (DF_BETA_LINEAR, 1000);
  int ts[1001];
  GError *error = NULL;

  g_assert_false (df_schedule_timesteps (s, 0, DF_SPACING_LEADING, ts,
                                         &error));
  g_assert_error (error, DF_SCHEDULE_ERROR, DF_SCHEDULE_ERROR_INVALID);
  g_clear_error (&error);
  g_assert_false (df_schedule_timesteps (s, 1001, DF_SPACING_TRAILING, ts,
                                         &error));
  g_assert_error (error, DF_SCHEDULE_ERROR, DF_SCHEDULE_ERROR_INVALID);
  g_clear_error (&error);
  g_assert_false (df_schedule_timesteps (s, 10, (DfSpacing) 9, ts, &error));
  g_assert_error (error, DF_SCHEDULE_ERROR, DF_SCHEDULE_ERROR_INVALID);
  g_clear_error (&error);
  df_schedule_free (s);
}

/* Names round-trip; aliases and case are accepted; unknowns are refused. */
static void
test_names (void)
{
  DfBetaSchedule kind;
  DfSpacing sp;

  for (int k = DF_BETA_LINEAR; k <= DF_BETA_COSINE; k++)
    {
      g_assert_true (df_beta_schedule_parse (df_beta_schedule_name (k),
                                             &kind));
      g_assert_cmpint (kind, ==, k);
    }
  g_assert_cmpstr (df_beta_schedule_name (DF_BETA_SCALED_LINEAR), ==,
                   "scaled_linear");
  g_assert_true (df_beta_schedule_parse ("cosine", &kind));
  g_assert_cmpint (kind, ==, DF_BETA_COSINE);
  g_assert_true (df_beta_schedule_parse ("squaredcos_cap_v2", &kind));
  g_assert_cmpint (kind, ==, DF_BETA_COSINE);
  g_assert_true (df_beta_schedule_parse ("LINEAR", &kind));
  g_assert_cmpint (kind, ==, DF_BETA_LINEAR);
  g_assert_false (df_beta_schedule_parse ("sigmoid", &kind));
  g_assert_false (df_beta_schedule_parse ("", &kind));

  for (int k = DF_SPACING_LEADING; k <= DF_SPACING_LINSPACE; k++)
    {
      g_assert_true (df_spacing_parse (df_spacing_name (k), &sp));
      g_assert_cmpint (sp, ==, k);
    }
  g_assert_cmpstr (df_spacing_name (DF_SPACING_TRAILING), ==, "trailing");
  g_assert_false (df_spacing_parse ("karras", &sp));
  g_assert_cmpstr (df_spacing_name ((DfSpacing) 9), ==, "unknown");
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/engine/schedule/reference-values", test_reference_values);
  g_test_add_func ("/engine/schedule/invariants", test_invariants);
  g_test_add_func ("/engine/schedule/defaults", test_defaults);
  g_test_add_func ("/engine/schedule/errors", test_errors);
  g_test_add_func ("/engine/schedule/spacing-properties",
                   test_spacing_properties);
  g_test_add_func ("/engine/schedule/spacing-reference",
                   test_spacing_reference);
  g_test_add_func ("/engine/schedule/spacing-errors", test_spacing_errors);
  g_test_add_func ("/engine/schedule/names", test_names);
  return g_test_run ();
}
