/* test-blas.c: the OpenBLAS core-type decision and df_sgemm.
 *
 * The decision is driven with made-up CPUs; the real machine only shows up
 * in the last tests.  Run as "test-blas --print-blas" it prints what the
 * engine chose, for the separate-process check.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <glib.h>

#include "blas.h"

static const DfCpuFeatures cpu_sse = { 0 };
static const DfCpuFeatures cpu_avx = { .avx = TRUE, .os_ymm = TRUE };
static const DfCpuFeatures cpu_avx2 = {
  .avx = TRUE, .fma = TRUE, .avx2 = TRUE, .os_ymm = TRUE,
};
static const DfCpuFeatures cpu_avx512 = {
  .avx = TRUE, .fma = TRUE, .avx2 = TRUE, .avx512f = TRUE, .avx512bw = TRUE,
  .avx512dq = TRUE, .avx512vl = TRUE, .avx512cd = TRUE, .os_ymm = TRUE,
  .os_zmm = TRUE,
};

static void
test_best_coretype (void)
{
  DfCpuFeatures no_os_zmm = cpu_avx512, no_cd = cpu_avx512;
  DfCpuFeatures no_os_ymm = cpu_avx2, no_fma = cpu_avx2;

  no_os_zmm.os_zmm = FALSE;
  no_cd.avx512cd = FALSE;
  no_os_ymm.os_ymm = FALSE;
  no_fma.fma = FALSE;
  g_assert_cmpstr (df_cpu_best_coretype (&cpu_avx512), ==, "SkylakeX");
  g_assert_cmpstr (df_cpu_best_coretype (&cpu_avx2), ==, "Haswell");
  g_assert_cmpstr (df_cpu_best_coretype (&cpu_avx), ==, "Sandybridge");
  g_assert_null (df_cpu_best_coretype (&cpu_sse));

  /* Instructions the OS does not save registers for do not count. */
  g_assert_cmpstr (df_cpu_best_coretype (&no_os_zmm), ==, "Haswell");
  g_assert_cmpstr (df_cpu_best_coretype (&no_cd), ==, "Haswell");
  g_assert_null (df_cpu_best_coretype (&no_os_ymm));
  g_assert_cmpstr (df_cpu_best_coretype (&no_fma), ==, "Sandybridge");
}

static void
test_decide_prescott_avx512 (void)
{
  g_assert_cmpstr (df_blas_decide_coretype (&cpu_avx512, "Prescott", NULL),
                   ==, "SkylakeX");
  g_assert_cmpstr (df_blas_decide_coretype (&cpu_avx512, "Core2", NULL),
                   ==, "SkylakeX");
  g_assert_cmpstr (df_blas_decide_coretype (&cpu_avx512, "Katmai", NULL),
                   ==, "SkylakeX");
}

static void
test_decide_zen_avx2 (void)
{
  g_assert_null (df_blas_decide_coretype (&cpu_avx2, "Zen", NULL));
  g_assert_null (df_blas_decide_coretype (&cpu_avx2, "Haswell", NULL));
}

static void
test_decide_prescott_avx2 (void)
{
  g_assert_cmpstr (df_blas_decide_coretype (&cpu_avx2, "Prescott", NULL),
                   ==, "Haswell");
  g_assert_cmpstr (df_blas_decide_coretype (&cpu_avx2, "Nehalem", NULL),
                   ==, "Haswell");
  g_assert_cmpstr (df_blas_decide_coretype (&cpu_avx2, "Sandybridge", NULL),
                   ==, "Haswell");
  g_assert_cmpstr (df_blas_decide_coretype (&cpu_avx, "Atom", NULL),
                   ==, "Sandybridge");
}

static void
test_decide_levels (void)
{
  /* Haswell-level on an AVX-512 CPU is upgraded; Zen counts as Haswell. */
  g_assert_cmpstr (df_blas_decide_coretype (&cpu_avx512, "Haswell", NULL),
                   ==, "SkylakeX");
  g_assert_cmpstr (df_blas_decide_coretype (&cpu_avx512, "Zen", NULL),
                   ==, "SkylakeX");
  /* Newer AVX-512 cores are kept, and nothing is ever downgraded. */
  g_assert_null (df_blas_decide_coretype (&cpu_avx512, "Cooperlake", NULL));
  g_assert_null (df_blas_decide_coretype (&cpu_avx512, "SapphireRapids",
                                          NULL));
  g_assert_null (df_blas_decide_coretype (&cpu_avx512, "SkylakeX", NULL));
  g_assert_null (df_blas_decide_coretype (&cpu_avx2, "SkylakeX", NULL));
  /* A CPU without AVX has nothing better to offer. */
  g_assert_null (df_blas_decide_coretype (&cpu_sse, "Prescott", NULL));
  /* A name diffuse does not know is left alone. */
  g_assert_null (df_blas_decide_coretype (&cpu_avx512, "Zen5", NULL));
  g_assert_null (df_blas_decide_coretype (&cpu_avx512, NULL, NULL));
}

static void
test_decide_user_env (void)
{
  g_assert_null (df_blas_decide_coretype (&cpu_avx512, "Prescott",
                                          "Prescott"));
  g_assert_null (df_blas_decide_coretype (&cpu_avx2, "Prescott", "Core2"));
  g_assert_null (df_blas_decide_coretype (&cpu_avx512, "Prescott", ""));
}

/* C = alpha op(A) op(B) + beta C in double, row-major. */
static void
naive_gemm (gboolean ta, gboolean tb, int M, int N, int K, double alpha,
            const float *A, int lda, const float *B, int ldb, double beta,
            const float *C0, double *C, double *mag, int ldc)
{
  int i, j, k;

  for (i = 0; i < M; i++)
    for (j = 0; j < N; j++)
      {
        double s = 0, m = 0;

        for (k = 0; k < K; k++)
          {
            double a = ta ? A[k * lda + i] : A[i * lda + k];
            double b = tb ? B[j * ldb + k] : B[k * ldb + j];

            s += a * b;
            m += fabs (a * b);
          }
        C[i * ldc + j] = alpha * s + beta * C0[i * ldc + j];
        mag[i * ldc + j] = fabs (alpha) * m + fabs (beta * C0[i * ldc + j]);
      }
}

static void
test_sgemm (void)
{
  const int shapes[][3] = {
    { 1, 1, 1 }, { 7, 5, 3 }, { 33, 17, 65 }, { 3, 129, 2 }, { 64, 1, 31 },
    { 1, 50, 77 }, { 97, 101, 9 }, { 128, 64, 288 },
  };
  GRand *rng = g_rand_new_with_seed (7);
  double worst = 0;
  guint s;
  int t;

  for (s = 0; s < G_N_ELEMENTS (shapes); s++)
    for (t = 0; t < 4; t++)
      {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        gboolean ta = t & 1, tb = t >> 1;
        /* Leading dimensions with padding, as the engine's im2col uses. */
        int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
        int arows = ta ? K : M, brows = tb ? N : K;
        float *A = g_new (float, arows * lda);
        float *B = g_new (float, brows * ldb);
        float *C = g_new (float, M * ldc);
        float *C0 = g_new (float, M * ldc);
        double *ref = g_new (double, M * ldc);
        double *mag = g_new (double, M * ldc);
        int i, j;

        for (i = 0; i < arows * lda; i++)
          A[i] = g_rand_double_range (rng, -1, 1);
        for (i = 0; i < brows * ldb; i++)
          B[i] = g_rand_double_range (rng, -1, 1);
        for (i = 0; i < M * ldc; i++)
          C[i] = C0[i] = g_rand_double_range (rng, -1, 1);

        df_sgemm (ta ? DF_TRANS : DF_NO_TRANS, tb ? DF_TRANS : DF_NO_TRANS,
                  M, N, K, 0.75f, A, lda, B, ldb, -0.5f, C, ldc);
        naive_gemm (ta, tb, M, N, K, 0.75, A, lda, B, ldb, -0.5, C0, ref,
                    mag, ldc);

        /* Tolerance: float accumulation, 1e-5 of the sum of magnitudes;
         * the padding columns of C must be untouched. */
        for (i = 0; i < M; i++)
          {
            for (j = 0; j < N; j++)
              {
                double err = fabs (C[i * ldc + j] - ref[i * ldc + j])
                             / (mag[i * ldc + j] + 1e-30);

                worst = MAX (worst, err);
                if (err > 1e-5)
                  g_error ("sgemm %dx%dx%d ta=%d tb=%d: C[%d,%d] = %g, "
                           "reference %g", M, N, K, ta, tb, i, j,
                           C[i * ldc + j], ref[i * ldc + j]);
              }
            for (j = N; j < ldc; j++)
              g_assert_cmpfloat (C[i * ldc + j], ==, C0[i * ldc + j]);
          }
        g_free (A);
        g_free (B);
        g_free (C);
        g_free (C0);
        g_free (ref);
        g_free (mag);
      }
  g_test_message ("worst error relative to sum |alpha a b| + |beta c|: %.3g "
                  "(tolerance 1e-5)", worst);
  g_rand_free (rng);
}

static void
test_corename (void)
{
  DfCpuFeatures f;
  const char *best;

  g_assert_true (df_blas_init (NULL));
  g_assert_nonnull (df_blas_corename ());
  g_assert_cmpstr (df_blas_corename (), !=, "");
  g_assert_nonnull (df_blas_choice ());
  g_test_message ("core %s, %s; cpuid supports %s", df_blas_corename (),
                  df_blas_choice (), df_blas_cpu_coretype ());

  /* The engine's cpuid reading agrees with df_cpu_best_coretype. */
  df_cpu_features_read (&f);
  best = df_cpu_best_coretype (&f);
  g_assert_cmpstr (df_blas_cpu_coretype (), ==, best ? best : "none");

  /* If diffuse chose, it got the core it asked for, and it cleaned up. */
  if (g_str_has_prefix (df_blas_choice (), "chosen by diffuse"))
    g_assert_cmpstr (df_blas_corename (), ==, best);
  if (g_getenv ("OPENBLAS_CORETYPE") == NULL)
    g_assert_false (g_str_has_prefix (df_blas_choice (), "set by"));
}

static char *
run_helper (const char *coretype)
{
  char *self = g_file_read_link ("/proc/self/exe", NULL);
  char *argv[] = { self, "--print-blas", NULL };
  char **envp = g_get_environ ();
  char *out = NULL;
  GError *error = NULL;
  int status;

  envp = coretype ? g_environ_setenv (envp, "OPENBLAS_CORETYPE", coretype,
                                      TRUE)
                  : g_environ_unsetenv (envp, "OPENBLAS_CORETYPE");
  g_spawn_sync (NULL, argv, envp, G_SPAWN_DEFAULT, NULL, NULL, &out, NULL,
                &status, &error);
  g_assert_no_error (error);
  g_spawn_check_wait_status (status, &error);
  g_assert_no_error (error);
  g_test_message ("OPENBLAS_CORETYPE=%s: %s", coretype ? coretype : "(unset)",
                  out);
  g_strfreev (envp);
  g_free (self);
  return out;
}

static void
test_user_coretype_kept (void)
{
  char *out = run_helper ("Prescott");

  g_assert_nonnull (strstr (out, "corename=Prescott\n"));
  g_assert_nonnull (strstr (out, "choice=set by OPENBLAS_CORETYPE\n"));
  g_free (out);
}

static void
test_env_not_leaked (void)
{
  char *out = run_helper (NULL);

  /* Whatever was chosen, the child's environment is as it was. */
  g_assert_nonnull (strstr (out, "env=(unset)\n"));
  g_assert_null (strstr (out, "choice=set by"));
  g_free (out);
}

int
main (int argc, char **argv)
{
  if (argc == 2 && strcmp (argv[1], "--print-blas") == 0)
    {
      const char *env;

      if (!df_blas_init (NULL))
        return 1;
      env = g_getenv ("OPENBLAS_CORETYPE");
      printf ("corename=%s\nchoice=%s\nenv=%s\n", df_blas_corename (),
              df_blas_choice (), env ? env : "(unset)");
      return 0;
    }

  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/engine/blas/best-coretype", test_best_coretype);
  g_test_add_func ("/engine/blas/decide/prescott-avx512-skylakex",
                   test_decide_prescott_avx512);
  g_test_add_func ("/engine/blas/decide/zen-avx2-none", test_decide_zen_avx2);
  g_test_add_func ("/engine/blas/decide/prescott-avx2-haswell",
                   test_decide_prescott_avx2);
  g_test_add_func ("/engine/blas/decide/levels", test_decide_levels);
  g_test_add_func ("/engine/blas/decide/user-env-none", test_decide_user_env);
  g_test_add_func ("/engine/blas/sgemm-naive-double", test_sgemm);
  g_test_add_func ("/engine/blas/corename", test_corename);
  g_test_add_func ("/engine/blas/user-coretype-kept", test_user_coretype_kept);
  g_test_add_func ("/engine/blas/env-not-leaked", test_env_not_leaked);
  return g_test_run ();
}
