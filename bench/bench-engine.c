/* bench-engine: the engine's side of scripts/bench.sh.
 *
 * Builds a UNet from a diffusers config with fixed-seed weights, saves them
 * for PyTorch, and times, on the given thread count: the forward pass at
 * each batch size, the same GEMMs replayed alone through cblas_sgemm (the
 * ceiling), and training steps.  Prints one JSON object on stdout.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <json-glib/json-glib.h>
#include <omp.h>

#include "blas.h"
#include "model.h"
#include "rng.h"
#include "train.h"

static char *opt_config = "weights/fashion-mnist-unet.json";
static char *opt_weights_out = NULL;
static char *opt_batches = "1,16";
static int opt_threads = 2;
static int opt_train_batch = 64;
static int opt_repeats = 5;
static gboolean opt_gemm_profile = FALSE;

static GOptionEntry entries[] = {
  { "config", 0, 0, G_OPTION_ARG_FILENAME, &opt_config,
    "diffusers config JSON of the UNet", "FILE" },
  { "weights-out", 0, 0, G_OPTION_ARG_FILENAME, &opt_weights_out,
    "write the benchmarked weights here (for PyTorch)", "FILE" },
  { "batches", 0, 0, G_OPTION_ARG_STRING, &opt_batches,
    "forward batch sizes", "N,N" },
  { "threads", 0, 0, G_OPTION_ARG_INT, &opt_threads, "threads", "N" },
  { "train-batch", 0, 0, G_OPTION_ARG_INT, &opt_train_batch,
    "training batch size", "N" },
  { "repeats", 0, 0, G_OPTION_ARG_INT, &opt_repeats, "timed repeats", "N" },
  { "gemm-profile", 0, 0, G_OPTION_ARG_NONE, &opt_gemm_profile,
    "print a training step's GEMM shapes, their time alone and rate "
    "on stderr", NULL },
  { NULL }
};

static double
now (void)
{
  return g_get_monotonic_time () / 1e6;
}

/* CPU seconds of the whole process: on a loaded machine, steadier than the
 * wall clock for comparing builds (at one thread). */
static double
cpu_now (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

typedef struct {
  DfModel *m;
  float   *x, *eps;
  int      n, t;
  int     *labels;
} Forward;

static void
run_forward (Forward *f)
{
  GError *error = NULL;

  if (!df_model_eps (f->m, f->x, f->n, f->t, f->labels, f->eps, &error))
    g_error ("forward: %s", error->message);
}

/* Best of opt_repeats after two warm-up runs. */
static double
time_forward (Forward *f)
{
  double best = INFINITY;

  for (int r = 0; r < opt_repeats + 2; r++)
    {
      double t0 = now ();
      run_forward (f);
      if (r >= 2)
        best = MIN (best, now () - t0);
    }
  return best;
}

/* Replays every GEMM a batch-n forward pass makes, on scratch buffers: the
 * ceiling the engine is measured against.  It runs each call the way the
 * engine runs it, on a one-thread OpenBLAS (the ops force that), and spreads
 * all the calls of the pass over the OpenMP threads at once, statically, with
 * no barrier between layers and no gathering or scattering: the engine can
 * only be slower. */
static void
time_gemms (Forward *f, double *seconds, double *flops)
{
  GArray *calls = g_array_new (FALSE, FALSE, sizeof (DfGemmCall));
  gsize a_max = 0, b_max = 0, c_max = 0;
  int threads = omp_get_max_threads ();
  float *A, *B, *C;
  double best = INFINITY;

  df_blas_trace (calls);
  run_forward (f);
  df_blas_trace (NULL);

  *flops = 0;
  for (guint i = 0; i < calls->len; i++)
    {
      DfGemmCall *c = &g_array_index (calls, DfGemmCall, i);
      a_max = MAX (a_max, (gsize) c->M * c->K);
      b_max = MAX (b_max, (gsize) c->K * c->N);
      c_max = MAX (c_max, (gsize) c->M * c->N);
      *flops += 2.0 * c->M * c->N * c->K;
    }
  /* A and B are shared read-only; C [threads][c_max], padded apart. */
  c_max = (c_max + 63) & ~(gsize) 63;
  A = g_new (float, a_max + 1);
  B = g_new (float, b_max + 1);
  C = g_new0 (float, c_max * threads);
  df_rng_uniform (1, 0, 0, A, a_max + 1);
  df_rng_uniform (1, 1, 0, B, b_max + 1);

  for (int r = 0; r < opt_repeats + 2; r++)
    {
      double t0 = now ();
#pragma omp parallel for schedule(static)
      for (guint i = 0; i < calls->len; i++)
        {
          DfGemmCall *c = &g_array_index (calls, DfGemmCall, i);
          int lda = c->ta == DF_NO_TRANS ? c->K : c->M;
          int ldb = c->tb == DF_NO_TRANS ? c->N : c->K;
          df_sgemm (c->ta, c->tb, c->M, c->N, c->K, 1.0f, A, lda, B, ldb,
                    0.0f, C + c_max * omp_get_thread_num (), c->N);
        }
      if (r >= 2)
        best = MIN (best, now () - t0);
    }
  *seconds = best;
  g_free (A);
  g_free (B);
  g_free (C);
  g_array_unref (calls);
}

/* The machine's practical FP32 ceiling: a 1024-cube sgemm on each thread at
 * once (one-thread OpenBLAS each, as the engine runs it), best of the
 * repeats, in GFLOP/s over all threads. */
static double
time_peak (void)
{
  const int n = 1024;
  int threads = omp_get_max_threads ();
  gsize nn = (gsize) n * n;
  float *A = g_new (float, nn), *B = g_new (float, nn);
  float *C = g_new0 (float, nn * threads);
  double best = INFINITY;

  df_blas_set_threads (1);
  df_rng_uniform (1, 0, 0, A, nn);
  df_rng_uniform (1, 1, 0, B, nn);
  for (int r = 0; r < opt_repeats + 2; r++)
    {
      double t0 = now ();
#pragma omp parallel for schedule(static, 1)
      for (int i = 0; i < threads; i++)
        df_sgemm (DF_NO_TRANS, DF_NO_TRANS, n, n, n, 1.0f, A, n, B, n, 0.0f,
                  C + nn * i, n);
      if (r >= 2)
        best = MIN (best, now () - t0);
    }
  g_free (A);
  g_free (B);
  g_free (C);
  return 2.0 * nn * n * threads / best / 1e9;
}

typedef struct {
  DfGemmCall call;
  int        count;
  double     seconds;
} ShapeTime;

static int
shape_time_cmp (gconstpointer a, gconstpointer b)
{
  const ShapeTime *x = a, *y = b;

  return x->seconds < y->seconds ? 1 : x->seconds > y->seconds ? -1 : 0;
}

/* The GEMMs calls (a training step's) grouped by shape, each shape timed
 * alone on one thread in CPU time, slowest total first: where the GEMM
 * time goes. */
static void
print_gemm_profile (GArray *calls)
{
  GArray *shapes = g_array_new (FALSE, TRUE, sizeof (ShapeTime));
  double total = 0, flops = 0;

  for (guint i = 0; i < calls->len; i++)
    {
      DfGemmCall *c = &g_array_index (calls, DfGemmCall, i);
      guint j;

      for (j = 0; j < shapes->len; j++)
        if (memcmp (&g_array_index (shapes, ShapeTime, j).call, c,
                    sizeof *c) == 0)
          break;
      if (j == shapes->len)
        {
          ShapeTime st = { *c, 0, 0 };
          g_array_append_val (shapes, st);
        }
      g_array_index (shapes, ShapeTime, j).count++;
    }
  for (guint j = 0; j < shapes->len; j++)
    {
      ShapeTime *st = &g_array_index (shapes, ShapeTime, j);
      DfGemmCall *c = &st->call;
      gsize na = (gsize) c->M * c->K, nb = (gsize) c->K * c->N;
      float *A = g_new0 (float, na), *B = g_new0 (float, nb);
      float *C = g_new0 (float, (gsize) c->M * c->N);
      int lda = c->ta == DF_NO_TRANS ? c->K : c->M;
      int ldb = c->tb == DF_NO_TRANS ? c->N : c->K;
      int reps = MAX (1, MIN (st->count, 200));
      double t0;

      df_sgemm (c->ta, c->tb, c->M, c->N, c->K, 1.0f, A, lda, B, ldb, 0.0f,
                C, c->N);
      t0 = cpu_now ();
      for (int r = 0; r < reps; r++)
        df_sgemm (c->ta, c->tb, c->M, c->N, c->K, 1.0f, A, lda, B, ldb, 1.0f,
                  C, c->N);
      st->seconds = (cpu_now () - t0) / reps * st->count;
      total += st->seconds;
      flops += 2.0 * c->M * c->N * c->K * st->count;
      g_free (A);
      g_free (B);
      g_free (C);
    }
  g_array_sort (shapes, shape_time_cmp);
  fprintf (stderr, "GEMMs of a training step alone: %.3f s, %.1f GFLOP/s\n",
           total, flops / total / 1e9);
  for (guint j = 0; j < shapes->len && j < 30; j++)
    {
      ShapeTime *st = &g_array_index (shapes, ShapeTime, j);
      DfGemmCall *c = &st->call;

      fprintf (stderr, "  %c%c M %5d N %5d K %6d x%5d: %7.1f ms %5.1f GFLOP/s\n",
               c->ta == DF_NO_TRANS ? 'N' : 'T',
               c->tb == DF_NO_TRANS ? 'N' : 'T', c->M, c->N, c->K, st->count,
               st->seconds * 1e3,
               2.0 * c->M * c->N * c->K * st->count / st->seconds / 1e9);
    }
  g_array_unref (shapes);
}

static DfDataset *
synthetic_data (int n, int c, int size, int classes)
{
  DfDataset *d = g_new0 (DfDataset, 1);

  d->n = n;
  d->c = c;
  d->h = d->w = size;
  d->images = g_new (float, (gsize) n * c * size * size);
  d->labels = g_new (int, n);
  d->num_classes = MAX (classes, 1);
  d->class_names = g_new0 (char *, d->num_classes + 1);
  for (int k = 0; k < d->num_classes; k++)
    d->class_names[k] = g_strdup_printf ("%d", k);
  df_rng_uniform (2, 0, 0, d->images, (gsize) n * c * size * size);
  for (gsize i = 0; i < (gsize) n * c * size * size; i++)
    d->images[i] = 2 * d->images[i] - 1;
  for (int i = 0; i < n; i++)
    d->labels[i] = i % d->num_classes;
  return d;
}

int
main (int argc, char **argv)
{
  GOptionContext *ctx = g_option_context_new ("- time the engine");
  GError *error = NULL;
  JsonParser *parser;
  DfUNetConfig cfg;
  DfSchedule *sched;
  DfModel *m;
  char **batches;
  int classes, size, cin;
  JsonBuilder *out = json_builder_new ();
  JsonGenerator *gen;

  g_option_context_add_main_entries (ctx, entries, NULL);
  if (!g_option_context_parse (ctx, &argc, &argv, &error))
    g_error ("%s", error->message);
  df_set_threads (opt_threads);

  /* The model: fixed-seed weights, saved for the PyTorch side. */
  parser = json_parser_new ();
  if (!json_parser_load_from_file (parser, opt_config, &error))
    g_error ("%s: %s", opt_config, error->message);
  df_unet_config_init (&cfg);
  if (!df_unet_config_from_json (&cfg, json_node_get_object (
                                   json_parser_get_root (parser)), &error))
    g_error ("%s: %s", opt_config, error->message);
  sched = df_schedule_new (DF_BETA_LINEAR, 1000, 0, 0, &error);
  classes = cfg.num_class_embeds;
  m = df_model_new (&cfg, FALSE, sched, NULL, classes > 0 ? classes - 1 : -1,
                    &error);
  if (m == NULL)
    g_error ("%s", error->message);
  df_unet_init (df_model_net (m), 1);
  if (opt_weights_out != NULL && !df_model_save (m, opt_weights_out, &error))
    g_error ("%s", error->message);
  size = cfg.sample_size;
  cin = cfg.in_channels;

  json_builder_begin_object (out);
  json_builder_set_member_name (out, "corename");
  json_builder_add_string_value (out, df_blas_corename ());
  json_builder_set_member_name (out, "choice");
  json_builder_add_string_value (out, df_blas_choice ());
  json_builder_set_member_name (out, "threads");
  json_builder_add_int_value (out, opt_threads);
  json_builder_set_member_name (out, "params");
  json_builder_add_int_value (out, df_unet_param_count (df_model_net (m)));
  json_builder_set_member_name (out, "flops_per_image");
  json_builder_add_double_value (out, df_unet_flops (df_model_net (m),
                                                     size, size));

  /* Forward passes, and the ceiling: the same GEMMs alone. */
  json_builder_set_member_name (out, "forward");
  json_builder_begin_object (out);
  batches = g_strsplit (opt_batches, ",", -1);
  for (char **b = batches; *b != NULL; b++)
    {
      Forward f = { m, NULL, NULL, atoi (*b), 500, NULL };
      gsize len = (gsize) f.n * cin * size * size;
      double secs, gemm_secs, gemm_flops;

      f.x = g_new (float, len);
      f.eps = g_new (float, len);
      df_rng_normal (3, 0, 0, f.x, len);
      if (classes > 0)
        {
          f.labels = g_new (int, f.n);
          for (int i = 0; i < f.n; i++)
            f.labels[i] = i % (classes - 1);
        }
      secs = time_forward (&f);
      time_gemms (&f, &gemm_secs, &gemm_flops);

      json_builder_set_member_name (out, *b);
      json_builder_begin_object (out);
      json_builder_set_member_name (out, "seconds");
      json_builder_add_double_value (out, secs);
      json_builder_set_member_name (out, "gflops");
      json_builder_add_double_value (out, df_unet_flops (df_model_net (m),
                                     size, size) * f.n / secs / 1e9);
      json_builder_set_member_name (out, "gemm_seconds");
      json_builder_add_double_value (out, gemm_secs);
      json_builder_set_member_name (out, "gemm_gflops");
      json_builder_add_double_value (out, gemm_flops / gemm_secs / 1e9);
      json_builder_end_object (out);
      g_free (f.x);
      g_free (f.eps);
      g_free (f.labels);
    }
  json_builder_end_object (out);
  g_strfreev (batches);

  /* Training steps on synthetic data of the model's shape. */
  {
    DfDataset *data = synthetic_data (1024, cin, size,
                                      classes > 0 ? classes - 1 : 0);
    DfTrainOptions o;
    DfTrainer *t;
    double best = INFINITY, best_cpu = INFINITY, loss;

    df_train_options_init (&o);
    o.batch = opt_train_batch;
    o.steps = 1 << 30;
    t = df_trainer_new (m, data, &o, &error);
    if (t == NULL)
      g_error ("%s", error->message);
    for (int r = 0; r < opt_repeats + 1; r++)
      {
        double t0 = now (), c0 = cpu_now ();
        if (!df_trainer_step (t, &loss, &error))
          g_error ("%s", error->message);
        if (r >= 1)
          {
            best = MIN (best, now () - t0);
            best_cpu = MIN (best_cpu, cpu_now () - c0);
          }
      }
    /* One traced step: the arithmetic of a step, in its GEMMs. */
    {
      GArray *calls = g_array_new (FALSE, FALSE, sizeof (DfGemmCall));
      double flops = 0;

      df_blas_trace (calls);
      if (!df_trainer_step (t, &loss, &error))
        g_error ("%s", error->message);
      df_blas_trace (NULL);
      for (guint i = 0; i < calls->len; i++)
        {
          DfGemmCall *c = &g_array_index (calls, DfGemmCall, i);
          flops += 2.0 * c->M * c->N * c->K;
        }
      json_builder_set_member_name (out, "train_step_gemm_flops");
      json_builder_add_double_value (out, flops);
      if (opt_gemm_profile)
        print_gemm_profile (calls);
      g_array_unref (calls);
    }
    json_builder_set_member_name (out, "train_step_cpu_s");
    json_builder_add_double_value (out, best_cpu);
    json_builder_set_member_name (out, "train_step_s");
    json_builder_add_double_value (out, best);
    json_builder_set_member_name (out, "train_batch");
    json_builder_add_int_value (out, o.batch);
    df_trainer_free (t);
    df_dataset_free (data);
  }
  json_builder_set_member_name (out, "sgemm_peak_gflops");
  json_builder_add_double_value (out, time_peak ());
  json_builder_end_object (out);

  gen = json_generator_new ();
  json_generator_set_root (gen, json_builder_get_root (out));
  {
    char *text = json_generator_to_data (gen, NULL);
    printf ("%s\n", text);
    g_free (text);
  }
  g_object_unref (gen);
  g_object_unref (out);
  g_object_unref (parser);
  df_model_free (m);
  df_schedule_free (sched);
  return 0;
}
