/* train.c: `diffuse train`: a class-conditional UNet (L_simple) or a noisy
 * classifier (cross-entropy) on an IDX folder or a folder of class folders.
 */
#include "cli.h"

#include <json-glib/json-glib.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "train.h"

/* Upper bounds that keep every size an int and a mistyped value from
 * reaching the allocator; the memory estimate decides below them. */
#define MAX_BATCH      65536
#define MAX_SIZE       4096
#define MAX_CHANNELS   16384
#define MAX_LAYERS     64
#define MAX_TIMESTEPS  100000

/* The int options start at CLI_INT_UNSET: 0 is an error when given, not a
 * request for the default. */
typedef struct {
  char     *data, *task, *config, *channels, *attention, *beta_schedule;
  char     *lr_schedule, *seed, *checkpoint, *log, *plot, *out;
  int       layers, groups, size, image_channels, head_dim, timesteps;
  int       threads;
  gboolean  quiet;
  gboolean  checkpoint_minutes_given;
} TrainArgs;

#define GIVEN(v) ((v) != CLI_INT_UNSET)

/* The network: from a diffusers config file, or from the short options. */
static gboolean
build_config (const TrainArgs *a, int channels, DfUNetConfig *cfg,
              GError **error)
{
  df_unet_config_init (cfg);

  if (a->config)
    {
      JsonParser *parser = json_parser_new ();
      JsonNode *root;
      gboolean ok;

      if (a->channels || a->attention || GIVEN (a->layers)
          || GIVEN (a->groups) || GIVEN (a->head_dim))
        {
          g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                       "train: give --config or the network options "
                       "(--channels, --layers, --attention, --groups, "
                       "--head-dim), not both");
          g_object_unref (parser);
          return FALSE;
        }
      if (!json_parser_load_from_file (parser, a->config, error))
        {
          g_prefix_error (error, "--config %s: ", a->config);
          g_object_unref (parser);
          return FALSE;
        }
      root = json_parser_get_root (parser);
      if (root == NULL || !JSON_NODE_HOLDS_OBJECT (root))
        {
          g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                       "--config %s: expected a JSON object of UNet2DModel "
                       "settings", a->config);
          g_object_unref (parser);
          return FALSE;
        }
      ok = df_unet_config_from_json (cfg, json_node_get_object (root), error);
      if (!ok)
        g_prefix_error (error, "--config %s: ", a->config);
      g_object_unref (parser);
      if (!ok)
        return FALSE;
    }
  else
    {
      int att[DF_MAX_BLOCKS], n_att = 0, n;

      if (!cli_parse_int_list ("--channels", a->channels ? a->channels
                               : "32,64,128", cfg->block_out_channels,
                               DF_MAX_BLOCKS, &n, error))
        return FALSE;
      if (a->attention == NULL)
        {
          /* Attention in the last block only, as in the shipped model. */
          for (int i = 0; i < n; i++)
            att[i] = i == n - 1;
          n_att = n;
        }
      else if (!cli_parse_int_list ("--attention", a->attention, att,
                                    DF_MAX_BLOCKS, &n_att, error))
        return FALSE;
      for (int i = 0; i < n_att; i++)
        if (att[i] != 0 && att[i] != 1)
          {
            /* A flag per block (attention or not), not a head count. */
            g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                         "--attention %s: %d is not 0 or 1; give one 0 (no "
                         "attention) or 1 (attention) per block",
                         a->attention, att[i]);
            return FALSE;
          }
      if (n_att != n)
        {
          g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                       "--attention %s has %d entries, --channels %d: give "
                       "one 0 or 1 per block", a->attention, n_att, n);
          return FALSE;
        }
      cfg->n_blocks = n;
      for (int i = 0; i < n; i++)
        {
          cfg->down_attention[i] = att[i] != 0;
          cfg->up_attention[n - 1 - i] = att[i] != 0;
        }
      cfg->layers_per_block = GIVEN (a->layers) ? a->layers : 1;
      cfg->norm_num_groups = GIVEN (a->groups) ? a->groups : 8;
      if (GIVEN (a->head_dim))
        cfg->attention_head_dim = a->head_dim;
      cfg->sample_size = 28;
    }

  if (GIVEN (a->size))
    cfg->sample_size = a->size;
  if (channels > 0)
    cfg->in_channels = cfg->out_channels = channels;
  return TRUE;
}

/* The network's sizes below the bounds, whichever way they were given. */
static gboolean
check_bounds (const TrainArgs *a, const DfUNetConfig *cfg, GError **error)
{
  int factor;

  for (int i = 0; i < cfg->n_blocks; i++)
    if (cfg->block_out_channels[i] > MAX_CHANNELS)
      {
        if (a->config && a->channels == NULL)
          g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                       "--config %s: block_out_channels entry %d is %d; "
                       "give at most %d channels a block", a->config, i,
                       cfg->block_out_channels[i], MAX_CHANNELS);
        else
          g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                       "--channels %s: %d is too many; give at most %d "
                       "channels a block", a->channels,
                       cfg->block_out_channels[i], MAX_CHANNELS);
        return FALSE;
      }
  if (cfg->sample_size > MAX_SIZE)
    {
      if (GIVEN (a->size))
        g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                     "--size %d: give at most %d pixels", a->size, MAX_SIZE);
      else
        g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                     "--config %s: sample_size %d is more than %d pixels; "
                     "give a smaller --size", a->config, cfg->sample_size,
                     MAX_SIZE);
      return FALSE;
    }
  /* The down path halves the size at each block but the last and the up
   * path doubles it back (the engine's own check words this by config
   * key). */
  factor = 1 << (cfg->n_blocks - 1);
  if (GIVEN (a->size) && cfg->sample_size % factor != 0)
    {
      int lo = cfg->sample_size / factor * factor;
      char *sizes = lo > 0 ? g_strdup_printf ("%d or %d", lo, lo + factor)
                           : g_strdup_printf ("%d", factor);

      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--size %d: with %d blocks the size must be a multiple "
                   "of %d (the UNet halves it %d times on the way down and "
                   "doubles it back on the way up%s); %s would do", a->size,
                   cfg->n_blocks, factor, cfg->n_blocks - 1,
                   a->task != NULL && strcmp (a->task, "classifier") == 0
                   ? ", and a classifier guides a UNet of its size" : "",
                   sizes);
      g_free (sizes);
      return FALSE;
    }
  if (cfg->layers_per_block > MAX_LAYERS)
    {
      if (GIVEN (a->layers))
        g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                     "--layers %d: give at most %d layers a block", a->layers,
                     MAX_LAYERS);
      else
        g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                     "--config %s: layers_per_block %d is more than %d",
                     a->config, cfg->layers_per_block, MAX_LAYERS);
      return FALSE;
    }
  return TRUE;
}

/* Bytes the address-space limit (ulimit -v) leaves, or G_MAXDOUBLE. */
static double
address_space_left (void)
{
  struct rlimit rl;
  char *statm = NULL;
  double used = 0;

  if (getrlimit (RLIMIT_AS, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
    return G_MAXDOUBLE;

  /* What is mapped already (libraries, OpenBLAS, the images) counts. */
  if (g_file_get_contents ("/proc/self/statm", &statm, NULL, NULL))
    used = g_ascii_strtod (statm, NULL) * sysconf (_SC_PAGESIZE);
  g_free (statm);
  return (double) rl.rlim_cur - used;
}

/* A network that cannot fit is refused before it is built: a failed
 * allocation inside GLib aborts.  data_bytes: the images, once loaded. */
static gboolean
check_memory (const DfUNetConfig *cfg, gboolean classifier, int batch,
              double data_bytes, GError **error)
{
  const double gib = 1024.0 * 1024 * 1024;
  double need = df_train_memory_estimate (cfg, classifier, batch, NULL);
  double phys = (double) sysconf (_SC_PHYS_PAGES) * sysconf (_SC_PAGESIZE);
  double left = address_space_left ();
  char *images = data_bytes > 0
                 ? g_strdup_printf (" besides the images' %.1f GiB",
                                    data_bytes / gib)
                 : g_strdup ("");
  gboolean ok = TRUE;

  if (phys > 0 && need + data_bytes > phys)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "train: this network at batch %d needs about %.1f GiB%s; "
                   "the machine has %.1f GiB (use a smaller --batch, --size "
                   "or --channels)", batch, need / gib, images, phys / gib);
      ok = FALSE;
    }
  else if (need > left)
    {
      g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                   "train: this network at batch %d needs about %.1f GiB%s; "
                   "the address-space limit (ulimit -v) leaves %.1f GiB (use "
                   "a smaller --batch, --size or --channels)", batch,
                   need / gib, images, MAX (left, 0) / gib);
      ok = FALSE;
    }
  g_free (images);
  return ok;
}

/* Two outputs on one file overwrite each other (the plot over the log,
 * the weights over the checkpoint): the same name written two ways, a
 * link, or a hard link. */
static gboolean
check_distinct_outputs (const TrainArgs *a, GError **error)
{
  const char *options[4] = { "--out", "--checkpoint", "--log", "--plot" };
  const char *paths[4] = { a->out, a->checkpoint, a->log, a->plot };
  gboolean ok = TRUE;

  for (int i = 0; i < 4 && ok; i++)
    for (int j = i + 1; j < 4 && ok; j++)
      {
        gboolean same = paths[i] && paths[j]
                        && cli_same_file (paths[i], paths[j]);

        if (same)
          {
            g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
                         "%s %s and %s %s are the same file: give --out, "
                         "--checkpoint, --log and --plot each a file of "
                         "its own", options[i], paths[i], options[j],
                         paths[j]);
            ok = FALSE;
          }
      }
  return ok;
}

static void
train_progress (gpointer data, const DfTrainProgress *p)
{
  CliProgress *progress = data;
  char *eta = cli_format_duration (p->eta_seconds);
  char *line = g_strdup_printf ("train: step %d/%d, loss %.5f (batch %.5f), "
                                "lr %.3g, %.1f img/s, ETA %s", p->step,
                                p->steps, p->smoothed_loss, p->loss, p->lr,
                                p->img_per_s, eta);

  cli_progress_text (progress, line, p->step >= p->steps);
  g_free (line);
  g_free (eta);
}

/* A size option given as 0 or less. */
static gboolean
check_positive (const char *option, int v, const char *fallback,
                GError **error)
{
  if (!GIVEN (v) || v >= 1)
    return TRUE;
  g_set_error (error, CLI_ERROR, CLI_ERROR_INVALID,
               "%s %d: give 1 or more (leave it out for %s)", option, v,
               fallback);
  return FALSE;
}

static gboolean
check_options (const TrainArgs *a, const DfTrainOptions *o, GError **error)
{
  const char *bad = NULL;

  if (!check_positive ("--size", a->size, "28, or the --config's size", error)
      || !check_positive ("--layers", a->layers, "1", error)
      || !check_positive ("--groups", a->groups, "8", error)
      || !check_positive ("--head-dim", a->head_dim, "diffusers' 8", error))
    return FALSE;

  if (a->data == NULL)
    bad = "train: give the images with --data DIR (an IDX folder or a "
          "folder of class folders)";
  else if (a->out == NULL)
    bad = "train: give the weights file to write with --out PATH";
  else if (o->steps < 1)
    bad = "--steps: give at least 1 optimiser step";
  else if (o->batch < 1)
    bad = "--batch: give at least 1 image per step";
  else if (o->batch > MAX_BATCH)
    bad = "--batch: give at most " G_STRINGIFY (MAX_BATCH) " images per step";
  else if (!(o->lr > 0) || isinf (o->lr))
    bad = "--lr: give a learning rate > 0";
  else if (o->warmup < 0)
    bad = "--warmup: give 0 or more steps";
  else if (!(o->weight_decay >= 0) || isinf (o->weight_decay))
    bad = "--weight-decay: give a finite weight decay, 0 or more";
  else if (o->lr * o->weight_decay >= 1)
    bad = "--weight-decay: with this --lr it would shrink the weights by "
          "more than themselves each step; give one below 1 / lr";
  else if (!(o->ema_decay >= 0 && o->ema_decay < 1))
    bad = "--ema: give a decay in [0, 1)";
  else if (!(o->grad_clip >= 0))
    bad = "--grad-clip: give 0 (off) or a norm > 0";
  else if (!(o->p_uncond >= 0 && o->p_uncond <= 1))
    bad = "--p-uncond: give a probability in [0, 1]";
  else if (!(o->checkpoint_minutes >= 0))
    bad = "--checkpoint-minutes: give 0 or more";
  else if (a->checkpoint_minutes_given && o->checkpoint == NULL)
    bad = "--checkpoint-minutes sets how often --checkpoint is written: "
          "give --checkpoint PATH too, or drop --checkpoint-minutes";
  else if (o->resume && o->checkpoint == NULL)
    bad = "--resume needs --checkpoint PATH";
  else if (a->threads < 0 || a->threads > DF_MAX_THREADS)
    bad = "--threads: give 0 (all cores) to " G_STRINGIFY (DF_MAX_THREADS);
  else if (GIVEN (a->image_channels) && a->image_channels != 1
           && a->image_channels != 3)
    bad = "--image-channels: give 1 (gray) or 3 (RGB)";
  else if (a->timesteps < 1)
    bad = "--timesteps: give at least 1";
  else if (a->timesteps > MAX_TIMESTEPS)
    bad = "--timesteps: give at most " G_STRINGIFY (MAX_TIMESTEPS);

  if (bad)
    g_set_error_literal (error, CLI_ERROR, CLI_ERROR_INVALID, bad);
  return bad == NULL;
}

/* A --help text that shows a default; kept in texts until the end. */
static const char *
help_text (GPtrArray *texts, const char *format, ...) G_GNUC_PRINTF (2, 3);

static const char *
help_text (GPtrArray *texts, const char *format, ...)
{
  va_list args;
  char *text;

  va_start (args, format);
  text = g_strdup_vprintf (format, args);
  va_end (args);
  g_ptr_array_add (texts, text);
  return text;
}

/* The engine's defaults, for --help (taken before the options array is
 * built from them). */
static DfTrainOptions
train_defaults (void)
{
  DfTrainOptions d;

  df_train_options_init (&d);
  return d;
}

int
cli_train (int argc, char **argv)
{
  TrainArgs a = { 0 };
  DfTrainOptions o, d = train_defaults ();
  GPtrArray *texts = g_ptr_array_new_with_free_func (g_free);
  GOptionEntry entries[] = {
    { "data", 'd', 0, G_OPTION_ARG_FILENAME, &a.data,
      "Images: an IDX folder (Fashion-MNIST) or a folder of class folders",
      "DIR" },
    { "task", 0, 0, G_OPTION_ARG_STRING, &a.task,
      "diffusion (default: a class-conditional UNet) or classifier", "TASK" },
    { "config", 0, 0, G_OPTION_ARG_FILENAME, &a.config,
      "Network as a diffusers UNet2DModel config.json", "FILE" },
    { "channels", 0, 0, G_OPTION_ARG_STRING, &a.channels,
      "Channels per block (default 32,64,128)", "C1,C2,..." },
    { "layers", 0, 0, G_OPTION_ARG_INT, &a.layers,
      "ResNet layers per block (default 1)", "N" },
    { "attention", 0, 0, G_OPTION_ARG_STRING, &a.attention,
      "Attention per block, 0 or 1 (default: in the last block only, "
      "0,0,1 for three blocks)", "A1,A2,..." },
    { "groups", 0, 0, G_OPTION_ARG_INT, &a.groups,
      "GroupNorm groups (default 8)", "N" },
    { "head-dim", 0, 0, G_OPTION_ARG_INT, &a.head_dim,
      "attention_head_dim (default: diffusers' 8)", "N" },
    { "size", 0, 0, G_OPTION_ARG_INT, &a.size,
      "Image size (default 28)", "PIXELS" },
    { "image-channels", 0, 0, G_OPTION_ARG_INT, &a.image_channels,
      "1 gray or 3 RGB (default: 1 for IDX, 3 for image folders)", "N" },
    { "beta-schedule", 0, 0, G_OPTION_ARG_STRING, &a.beta_schedule,
      "linear (default), scaled_linear or cosine", "NAME" },
    { "timesteps", 'T', 0, G_OPTION_ARG_INT, &a.timesteps,
      "Training timesteps (default 1000)", "T" },
    { "steps", 's', 0, G_OPTION_ARG_INT, &o.steps,
      help_text (texts, "Optimiser steps (default %d)", d.steps), "N" },
    { "batch", 'b', 0, G_OPTION_ARG_INT, &o.batch,
      help_text (texts, "Images per step (default %d)", d.batch), "N" },
    { "lr", 0, 0, G_OPTION_ARG_DOUBLE, &o.lr,
      help_text (texts, "Peak learning rate (default %g)", d.lr), "LR" },
    { "warmup", 0, 0, G_OPTION_ARG_INT, &o.warmup,
      help_text (texts, "Linear warm-up steps (default %d)", d.warmup),
      "N" },
    { "lr-schedule", 0, 0, G_OPTION_ARG_STRING, &a.lr_schedule,
      help_text (texts, "After warm-up: constant or cosine (default %s)",
                 d.lr_schedule == DF_LR_COSINE ? "cosine" : "constant"),
      "NAME" },
    { "weight-decay", 0, 0, G_OPTION_ARG_DOUBLE, &o.weight_decay,
      help_text (texts, "AdamW decoupled weight decay (default %g)",
                 d.weight_decay), "WD" },
    { "ema", 0, 0, G_OPTION_ARG_DOUBLE, &o.ema_decay,
      help_text (texts, "EMA decay of the shipped weights (default %g)",
                 d.ema_decay), "DECAY" },
    { "grad-clip", 0, 0, G_OPTION_ARG_DOUBLE, &o.grad_clip,
      help_text (texts, "Clip the global gradient norm (0: off; default "
                 "%g)", d.grad_clip), "NORM" },
    { "p-uncond", 0, 0, G_OPTION_ARG_DOUBLE, &o.p_uncond,
      help_text (texts, "Probability of dropping the label to the "
                 "unconditional class (default %g)", d.p_uncond), "P" },
    { "hflip", 0, 0, G_OPTION_ARG_NONE, &o.hflip,
      "Random horizontal flips (default: none)", NULL },
    { "seed", 0, 0, G_OPTION_ARG_STRING, &a.seed,
      help_text (texts, "Seed of the initial weights and of every random "
                 "draw (default %" G_GUINT64_FORMAT ")", d.seed), "N" },
    { "checkpoint", 0, 0, G_OPTION_ARG_FILENAME, &a.checkpoint,
      "Checkpoint file (written atomically)", "PATH" },
    { "checkpoint-minutes", 0, 0, G_OPTION_ARG_DOUBLE, &o.checkpoint_minutes,
      help_text (texts, "Minutes between checkpoints, which rewrite --out "
                 "too (default %g; needs --checkpoint)",
                 d.checkpoint_minutes), "M" },
    { "resume", 0, 0, G_OPTION_ARG_NONE, &o.resume,
      "Continue from the checkpoint if it exists (the options that define "
      "the run must be the checkpoint's)", NULL },
    { "log", 0, 0, G_OPTION_ARG_FILENAME, &a.log,
      "Write step,loss,smoothed_loss,lr,img_per_s rows to this CSV: a fresh "
      "run starts it anew, --resume keeps the rows up to the checkpoint's "
      "step and replaces the rest", "CSV" },
    { "plot", 0, 0, G_OPTION_ARG_FILENAME, &a.plot,
      "Write the loss curve as a PNG at the end (needs --log)", "PNG" },
    { "out", 'o', 0, G_OPTION_ARG_FILENAME, &a.out,
      "Weights file to write (EMA weights)", "PATH" },
    { "threads", 'j', 0, G_OPTION_ARG_INT, &a.threads,
      "Threads (default 0: all cores)", "N" },
    { "quiet", 'q', 0, G_OPTION_ARG_NONE, &a.quiet, "No progress", NULL },
    { NULL }
  };
  GError *error = NULL;
  gboolean ok = FALSE, classifier, resumed = FALSE;
  DfBetaSchedule kind = DF_BETA_LINEAR;
  DfSchedule *sched = NULL;
  DfDataset *data = NULL;
  DfModel *m = NULL;
  DfTrainer *trainer = NULL;
  DfUNetConfig cfg;
  CliProgress progress;
  int channels;

  df_train_options_init (&o);
  a.timesteps = 1000;
  a.layers = a.groups = a.size = a.image_channels = a.head_dim = CLI_INT_UNSET;
  o.p_uncond = CLI_DOUBLE_UNSET;
  o.checkpoint_minutes = CLI_DOUBLE_UNSET;
  if (!cli_parse ("train", "", "Train a class-conditional UNet or a noisy "
                  "classifier; progress on stderr, EMA weights to --out.",
                  entries, &argc, &argv, &error))
    goto out;

  /* Everything that needs no data is checked first. */
  o.checkpoint = a.checkpoint;
  o.log_csv = a.log;
  o.output = a.out;
  if (a.task == NULL || strcmp (a.task, "diffusion") == 0)
    classifier = FALSE;
  else if (strcmp (a.task, "classifier") == 0)
    classifier = TRUE;
  else
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--task %s: give diffusion or classifier", a.task);
      goto out;
    }
  if (o.p_uncond != CLI_DOUBLE_UNSET && classifier)
    {
      /* The classifier has no unconditional class to drop labels to. */
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--p-uncond %g has no effect with --task classifier: drop "
                   "--p-uncond", o.p_uncond);
      goto out;
    }
  if (o.p_uncond == CLI_DOUBLE_UNSET)
    o.p_uncond = d.p_uncond;
  a.checkpoint_minutes_given = o.checkpoint_minutes != CLI_DOUBLE_UNSET;
  if (!a.checkpoint_minutes_given)
    o.checkpoint_minutes = d.checkpoint_minutes;
  if (!check_options (&a, &o, &error))
    goto out;
  if (a.lr_schedule == NULL)
    ;
  else if (strcmp (a.lr_schedule, "constant") == 0)
    o.lr_schedule = DF_LR_CONSTANT;
  else if (strcmp (a.lr_schedule, "cosine") == 0)
    o.lr_schedule = DF_LR_COSINE;
  else
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--lr-schedule %s: give constant or cosine", a.lr_schedule);
      goto out;
    }
  if (a.beta_schedule && !df_beta_schedule_parse (a.beta_schedule, &kind))
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--beta-schedule %s: give linear, scaled_linear or cosine",
                   a.beta_schedule);
      goto out;
    }
  if (a.seed && !cli_parse_u64 ("--seed", a.seed, &o.seed, &error))
    goto out;
  if (a.plot && a.log == NULL)
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "--plot draws the loss log: give --log CSV too");
      goto out;
    }
  if (!cli_check_folder ("--data", a.data, &error))
    goto out;
  if (!cli_check_output_file ("--out", a.out, &error)
      || !cli_check_output_file ("--checkpoint", a.checkpoint, &error)
      || !cli_check_output_file ("--log", a.log, &error)
      || !cli_check_output_file ("--plot", a.plot, &error)
      || !check_distinct_outputs (&a, &error))
    goto out;

  /* The network and schedule (the class count comes from the data); a
   * network that cannot fit is refused before the data is read. */
  channels = GIVEN (a.image_channels) ? a.image_channels : 0;
  if (channels == 0 && a.config == NULL)
    channels = cli_is_idx_folder (a.data, "train") ? 1 : 3;
  if (!build_config (&a, channels, &cfg, &error)
      || !check_bounds (&a, &cfg, &error)
      || !df_unet_config_validate (&cfg, &error)
      || !check_memory (&cfg, classifier, o.batch, 0, &error))
    goto out;
  sched = df_schedule_new (kind, a.timesteps, 0, 0, &error);
  if (sched == NULL)
    goto out;

  data = df_dataset_load (a.data, "train", cfg.sample_size, cfg.in_channels,
                          &error);
  if (data == NULL)
    goto out;
  /* The class count comes from the data; a --config that gives another
   * one was written for other data. */
  {
    int want = classifier ? data->num_classes : data->num_classes + 1;
    int given = classifier ? cfg.classifier_classes : cfg.num_class_embeds;

    if (given > 0 && given != want)
      {
        g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                     "--config %s: %s is %d, but %s has %d classes%s: give "
                     "%d, or leave the key out (the data sets it)", a.config,
                     classifier ? "classifier_classes" : "num_class_embeds",
                     given, a.data, data->num_classes,
                     classifier ? "" : " (and the unconditional label)",
                     want);
        goto out;
      }
  }
  if (classifier)
    {
      cfg.classifier_classes = data->num_classes;
      cfg.num_class_embeds = 0;
    }
  else
    {
      cfg.classifier_classes = 0;
      cfg.num_class_embeds = data->num_classes + 1;
    }
  if (!df_unet_config_validate (&cfg, &error)
      || !check_memory (&cfg, classifier, o.batch,
                        4.0 * data->n * data->c * data->h * data->w, &error))
    goto out;
  m = df_model_new (&cfg, classifier, sched,
                    (const char *const *) data->class_names,
                    classifier ? -1 : data->num_classes, &error);
  if (m == NULL)
    goto out;
  df_unet_init (df_model_net (m), o.seed);

  /* Train. */
  df_set_threads (a.threads);
  trainer = df_trainer_new (m, data, &o, &error);
  if (trainer == NULL || !df_trainer_resume (trainer, &resumed, &error))
    goto out;
  if (o.resume && !resumed && !a.quiet)
    fprintf (stderr, "train: no checkpoint at %s yet: starting at step 0\n",
             a.checkpoint);
  if (resumed && df_trainer_step_index (trainer) >= o.steps)
    {
      /* Running would only write the same weights again. */
      g_set_error (&error, CLI_ERROR, CLI_ERROR_INVALID,
                   "train: %s: checkpoint is at step %d, --steps is %d: "
                   "nothing to train (give --steps above %d to go on)",
                   a.checkpoint, df_trainer_step_index (trainer), o.steps,
                   df_trainer_step_index (trainer));
      goto out;
    }
  if (!a.quiet)
    {
      const DfTrainChange *changes;
      gsize n_params = df_unet_param_count (df_model_net (m));
      int n_changes;

      /* What a resumed run does differently, one line each. */
      changes = df_trainer_changes (trainer, &n_changes);
      for (int i = 0; i < n_changes; i++)
        fprintf (stderr, "train: resuming with %s %s (the checkpoint ran "
                 "%s)\n", changes[i].option, changes[i].value,
                 changes[i].checkpoint);
      fprintf (stderr, "train: %s, %" G_GSIZE_FORMAT " parameter%s, %d "
               "image%s of %d x %d x %d, %d class%s",
               classifier ? "noisy classifier" : "UNet", n_params,
               n_params == 1 ? "" : "s", data->n, data->n == 1 ? "" : "s",
               data->c, data->h, data->w, data->num_classes,
               data->num_classes == 1 ? "" : "es");
      if (resumed)
        fprintf (stderr, ", resumed at step %d",
                 df_trainer_step_index (trainer));
      fputc ('\n', stderr);
    }
  cli_progress_init (&progress, "train", o.steps, a.quiet);
  ok = df_trainer_run (trainer, train_progress, &progress, cli_cancellable (),
                       &error);
  cli_progress_finish (&progress);
  if (!ok)
    {
      /* Interrupted: the checkpoint and --out hold the steps done; draw
       * the loss so far too, and say where it is. */
      if (a.plot && g_error_matches (error, DF_TRAIN_ERROR,
                                     DF_TRAIN_ERROR_CANCELLED))
        {
          GError *plot_error = NULL;

          if (df_train_plot_loss (a.log, a.plot, &plot_error))
            {
              char *msg = g_strdup_printf ("%s (loss so far in %s)",
                                           error->message, a.plot);

              g_free (error->message);
              error->message = msg;
            }
          else
            {
              g_clear_error (&error);
              error = plot_error;
            }
        }
      goto out;
    }

  /* df_trainer_run wrote --out and the last checkpoint; the plot is ours. */
  if (a.plot && !df_train_plot_loss (a.log, a.plot, &error))
    {
      ok = FALSE;
      goto out;
    }
  printf ("train: wrote %s%s%s\n", a.out, a.plot ? " and " : "",
          a.plot ? a.plot : "");

out:
  if (!ok && error != NULL)
    {
      /* The engine's write errors show GLib's temporary file names. */
      cli_error_restore_path (error, a.out);
      cli_error_restore_path (error, a.checkpoint);
      cli_error_restore_path (error, a.log);
      cli_error_restore_path (error, a.plot);
    }
  if (trainer)
    df_trainer_free (trainer);
  if (m)
    df_model_free (m);
  if (data)
    df_dataset_free (data);
  if (sched)
    df_schedule_free (sched);
  g_free (a.data);
  g_free (a.task);
  g_free (a.config);
  g_free (a.channels);
  g_free (a.attention);
  g_free (a.beta_schedule);
  g_free (a.lr_schedule);
  g_free (a.seed);
  g_free (a.checkpoint);
  g_free (a.log);
  g_free (a.plot);
  g_free (a.out);
  g_ptr_array_free (texts, TRUE);
  return ok ? 0 : cli_fail (error);
}
