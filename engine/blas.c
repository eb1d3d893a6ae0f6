/* blas.c: OpenBLAS opened at run time (see blas.h).
 *
 * OpenBLAS 0.3.21 (DYNAMIC_ARCH) picks its kernels in its constructor from
 * cpuid's family and model numbers; virtual machines that report unusual
 * models get "Prescott" (SSE3) on AVX-512 Xeons, several times slower.  The
 * library reads OPENBLAS_CORETYPE only in that constructor, so to correct it
 * we close the library and open it again with the variable set.
 */
#include "blas.h"

#include <dlfcn.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <gio/gio.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <cblas.h>

#define DF_BLAS_LIB "libopenblas.so.0"

typedef void (*SgemmFn) (enum CBLAS_ORDER, enum CBLAS_TRANSPOSE,
                         enum CBLAS_TRANSPOSE, blasint, blasint, blasint,
                         float, const float *, blasint, const float *, blasint,
                         float, float *, blasint);

static struct {
  void    *lib;
  SgemmFn  sgemm;
  char  *(*get_corename) (void);
  void   (*set_threads) (int);
  int    (*get_threads) (void);
  char    *corename;
  char    *choice;
  const char *cpu_coretype;
  char    *error;
} blas;

/* ---- CPU features ---- */

void
df_cpu_features_read (DfCpuFeatures *f)
{
  g_return_if_fail (f != NULL);
  memset (f, 0, sizeof *f);

#if defined(__x86_64__) || defined(__i386__)
  {
    unsigned int a, b, c, d, max_leaf;
    gboolean osxsave;

    max_leaf = __get_cpuid_max (0, NULL);
    if (max_leaf < 1 || !__get_cpuid (1, &a, &b, &c, &d))
      return;
    f->fma = (c >> 12) & 1;
    osxsave = (c >> 27) & 1;
    f->avx = (c >> 28) & 1;

    /* The OS must save the wide registers, or using them faults. */
    if (osxsave)
      {
        unsigned int xcr0_lo, xcr0_hi;

        __asm__ volatile ("xgetbv" : "=a" (xcr0_lo), "=d" (xcr0_hi)
                          : "c" (0));
        f->os_ymm = (xcr0_lo & 0x06) == 0x06;
        f->os_zmm = f->os_ymm && (xcr0_lo & 0xe0) == 0xe0;
      }

    if (max_leaf >= 7)
      {
        __cpuid_count (7, 0, a, b, c, d);
        f->avx2 = (b >> 5) & 1;
        f->avx512f = (b >> 16) & 1;
        f->avx512dq = (b >> 17) & 1;
        f->avx512cd = (b >> 28) & 1;
        f->avx512bw = (b >> 30) & 1;
        f->avx512vl = (b >> 31) & 1;
      }
  }
#endif
}

/* ISA levels of the kernels: 0 SSE-era, 1 AVX, 2 AVX2 + FMA, 3 AVX-512. */
enum { LEVEL_UNKNOWN = -1, LEVEL_SSE, LEVEL_AVX, LEVEL_AVX2, LEVEL_AVX512 };

static const struct {
  const char *name;
  int         level;
} cores[] = {
  { "Unknown", LEVEL_SSE }, { "Katmai", LEVEL_SSE },
  { "Coppermine", LEVEL_SSE }, { "Northwood", LEVEL_SSE },
  { "Prescott", LEVEL_SSE }, { "Banias", LEVEL_SSE }, { "Atom", LEVEL_SSE },
  { "Core2", LEVEL_SSE }, { "Penryn", LEVEL_SSE },
  { "Dunnington", LEVEL_SSE }, { "Nehalem", LEVEL_SSE },
  { "Athlon", LEVEL_SSE }, { "Opteron", LEVEL_SSE },
  { "Opteron_SSE3", LEVEL_SSE }, { "Barcelona", LEVEL_SSE },
  { "Nano", LEVEL_SSE }, { "Bobcat", LEVEL_SSE },
  { "Sandybridge", LEVEL_AVX }, { "Bulldozer", LEVEL_AVX },
  { "Piledriver", LEVEL_AVX }, { "Steamroller", LEVEL_AVX },
  { "Haswell", LEVEL_AVX2 }, { "Excavator", LEVEL_AVX2 },
  { "Zen", LEVEL_AVX2 },
  { "SkylakeX", LEVEL_AVX512 }, { "Cooperlake", LEVEL_AVX512 },
  { "SapphireRapids", LEVEL_AVX512 },
};

static int
core_level (const char *name)
{
  guint i;

  for (i = 0; name != NULL && i < G_N_ELEMENTS (cores); i++)
    if (g_ascii_strcasecmp (cores[i].name, name) == 0)
      return cores[i].level;
  return LEVEL_UNKNOWN;
}

const char *
df_cpu_best_coretype (const DfCpuFeatures *f)
{
  g_return_val_if_fail (f != NULL, NULL);

  if (f->os_zmm && f->avx512f && f->avx512bw && f->avx512dq && f->avx512vl
      && f->avx512cd && f->avx2 && f->fma)
    return "SkylakeX";
  if (f->os_ymm && f->avx2 && f->fma && f->avx)
    return "Haswell";
  if (f->os_ymm && f->avx)
    return "Sandybridge";
  return NULL;
}

const char *
df_blas_decide_coretype (const DfCpuFeatures *f,
                         const char *openblas_corename,
                         const char *user_coretype)
{
  const char *best;
  int have;

  g_return_val_if_fail (f != NULL, NULL);

  if (user_coretype != NULL)
    return NULL;
  best = df_cpu_best_coretype (f);
  have = core_level (openblas_corename);
  if (best == NULL || have == LEVEL_UNKNOWN)
    return NULL;
  return have < core_level (best) ? best : NULL;
}

/* ---- opening the library ---- */

static gboolean
blas_load (void)
{
  blas.lib = dlopen (DF_BLAS_LIB, RTLD_NOW | RTLD_LOCAL);
  if (blas.lib == NULL)
    {
      blas.error = g_strdup_printf ("cannot open %s: %s (install "
                                    "libopenblas0-pthread)", DF_BLAS_LIB,
                                    dlerror ());
      return FALSE;
    }
  blas.sgemm = (SgemmFn) dlsym (blas.lib, "cblas_sgemm");
  blas.get_corename = (char *(*) (void)) dlsym (blas.lib,
                                                "openblas_get_corename");
  blas.set_threads = (void (*) (int)) dlsym (blas.lib,
                                             "openblas_set_num_threads");
  blas.get_threads = (int (*) (void)) dlsym (blas.lib,
                                             "openblas_get_num_threads");
  if (blas.sgemm == NULL || blas.get_corename == NULL
      || blas.set_threads == NULL || blas.get_threads == NULL)
    {
      blas.error = g_strdup_printf ("%s lacks cblas_sgemm or the openblas_ "
                                    "functions", DF_BLAS_LIB);
      dlclose (blas.lib);
      blas.lib = NULL;
      return FALSE;
    }
  g_free (blas.corename);
  blas.corename = g_strdup (blas.get_corename ());
  g_strstrip (blas.corename);
  return TRUE;
}

static void
blas_unload (void)
{
  dlclose (blas.lib);
  blas.lib = NULL;
  blas.sgemm = NULL;
}

/* A small product in every transpose combination against a double
 * reference: a kernel the CPU or the OS cannot run properly shows here. */
static gboolean
blas_self_check (void)
{
  enum { M = 13, N = 11, K = 37 };
  float A[M * K], B[K * N], C[M * N];
  int ta, tb, i, j, k;

  for (i = 0; i < M * K; i++)
    A[i] = (float) sin (0.37 * i + 0.1);
  for (i = 0; i < K * N; i++)
    B[i] = (float) cos (0.53 * i + 0.2);

  for (ta = 0; ta < 2; ta++)
    for (tb = 0; tb < 2; tb++)
      {
        blas.sgemm (CblasRowMajor, ta ? CblasTrans : CblasNoTrans,
                    tb ? CblasTrans : CblasNoTrans, M, N, K, 1.0f, A,
                    ta ? M : K, B, tb ? K : N, 0.0f, C, N);
        for (i = 0; i < M; i++)
          for (j = 0; j < N; j++)
            {
              double ref = 0, mag = 0;

              for (k = 0; k < K; k++)
                {
                  double a = ta ? A[k * M + i] : A[i * K + k];
                  double b = tb ? B[j * K + k] : B[k * N + j];

                  ref += a * b;
                  mag += fabs (a * b);
                }
              /* float accumulation of K terms: a few ulps of the magnitude. */
              if (!(fabs (C[i * N + j] - ref) <= 1e-5 * mag + 1e-6))
                return FALSE;
            }
      }
  return TRUE;
}

static gpointer
blas_open (gpointer unused)
{
  const char *user = g_getenv ("OPENBLAS_CORETYPE");
  DfCpuFeatures f;
  const char *force;
  char *detected;

  /* What the CPU can run, and what OpenBLAS chose by itself. */
  df_cpu_features_read (&f);
  blas.cpu_coretype = df_cpu_best_coretype (&f);
  if (blas.cpu_coretype == NULL)
    blas.cpu_coretype = "none";
  if (!blas_load ())
    return NULL;
  detected = g_strdup (blas.corename);
  force = df_blas_decide_coretype (&f, detected, user);
  g_debug ("cpuid supports %s; OpenBLAS chose %s%s%s", blas.cpu_coretype,
           detected, user ? ", OPENBLAS_CORETYPE=" : "", user ? user : "");

  if (force == NULL)
    blas.choice = g_strdup (user != NULL ? "set by OPENBLAS_CORETYPE"
                                         : "detected by OpenBLAS");
  else
    {
      /* Reopen with the core forced.  The variable is removed afterwards so
       * that child processes make their own choice. */
      blas_unload ();
      setenv ("OPENBLAS_CORETYPE", force, 0);
      if (!blas_load ())
        goto out;
      if (g_strcmp0 (g_getenv ("OPENBLAS_CORETYPE"), force) == 0)
        unsetenv ("OPENBLAS_CORETYPE");

      if (g_ascii_strcasecmp (blas.corename, force) != 0)
        blas.choice = g_strdup_printf ("detected by OpenBLAS (diffuse asked "
                                       "for %s from cpuid but OpenBLAS "
                                       "stayed %s)", force, blas.corename);
      else if (!blas_self_check ())
        {
          /* The forced kernel computes wrongly: go back to OpenBLAS's own
           * choice, which the self-check below verifies in turn. */
          blas_unload ();
          if (!blas_load ())
            goto out;
          blas.choice = g_strdup_printf ("detected by OpenBLAS (%s chosen "
                                         "from cpuid failed the sgemm "
                                         "self-check; back to %s)", force,
                                         blas.corename);
        }
      else
        blas.choice = g_strdup_printf ("chosen by diffuse from cpuid "
                                       "(OpenBLAS detected %s)", detected);
    }

  if (!blas_self_check ())
    blas.error = g_strdup_printf ("%s with core %s computes sgemm wrongly; "
                                  "set OPENBLAS_CORETYPE to another core "
                                  "(for example Haswell or Prescott)",
                                  DF_BLAS_LIB, blas.corename);
  g_debug ("OpenBLAS core %s: %s", blas.corename, blas.choice);

out:
  g_free (detected);
  return NULL;
}

gboolean
df_blas_init (GError **error)
{
  static GOnce once = G_ONCE_INIT;

  g_once (&once, blas_open, NULL);
  if (blas.error != NULL)
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND,
                           blas.error);
      return FALSE;
    }
  return TRUE;
}

static void
blas_require (void)
{
  if (!df_blas_init (NULL))
    g_error ("%s", blas.error);
}

const char *
df_blas_corename (void)
{
  blas_require ();
  return blas.corename;
}

const char *
df_blas_choice (void)
{
  blas_require ();
  return blas.choice;
}

const char *
df_blas_cpu_coretype (void)
{
  /* Known even when the library failed to open. */
  df_blas_init (NULL);
  return blas.cpu_coretype;
}

void
df_blas_set_threads (int n)
{
  blas_require ();
  blas.set_threads (n);
}

int
df_blas_get_threads (void)
{
  blas_require ();
  return blas.get_threads ();
}

/* The shape recorder of df_blas_trace; trace_calls is read without the
 * lock first so untraced calls cost one load. */
static GMutex trace_lock;
static GArray *volatile trace_calls;

void
df_blas_trace (GArray *calls)
{
  g_mutex_lock (&trace_lock);
  if (trace_calls != NULL)
    g_array_unref (trace_calls);
  trace_calls = calls != NULL ? g_array_ref (calls) : NULL;
  g_mutex_unlock (&trace_lock);
}

static void
trace_call (DfTranspose ta, DfTranspose tb, int M, int N, int K)
{
  DfGemmCall c = { ta, tb, M, N, K };

  g_mutex_lock (&trace_lock);
  if (trace_calls != NULL)
    g_array_append_val (trace_calls, c);
  g_mutex_unlock (&trace_lock);
}

void
df_sgemm (DfTranspose ta, DfTranspose tb, int M, int N, int K, float alpha,
          const float *A, int lda, const float *B, int ldb, float beta,
          float *C, int ldc)
{
  blas_require ();
  if (G_UNLIKELY (trace_calls != NULL))
    trace_call (ta, tb, M, N, K);
  blas.sgemm (CblasRowMajor, (enum CBLAS_TRANSPOSE) ta,
              (enum CBLAS_TRANSPOSE) tb, M, N, K, alpha, A, lda, B, ldb,
              beta, C, ldc);
}
