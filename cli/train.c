/* train.c: `diffuse train`: a class-conditional UNet (L_simple) or a noisy
 * classifier (cross-entropy) on an IDX folder or a folder of class folders.
 */
#include "cli.h"

#include <json-glib/json-glib.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "train.h"

/* The int options start at CLI_INT_UNSET: 0 is an error when given, not a
 * request for the default. */
typedef struct {
  char     *data, *task, *config, *channels, *attention, *beta_schedule;
  char     *lr_schedule, *seed, *checkpoint, *log, *plot, *out;
  int       layers, groups, size, image_channels, head_dim, timesteps;
  int       threads;
  gboolean  quiet;
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
  else if (!(o->lr > 0) || isinf (o->lr))
    bad = "--lr: give a learning rate > 0";
  else if (o->warmup < 0)
    bad = "--warmup: give 0 or more steps";
  else if (!(o->weight_decay >= 0))
    bad = "--weight-decay: give 0 or more";
  else if (!(o->ema_decay >= 0 && o->ema_decay < 1))
    bad = "--ema: give a decay in [0, 1)";
  else if (!(o->grad_clip >= 0))
    bad = "--grad-clip: give 0 (off) or a norm > 0";
  else if (!(o->p_uncond >= 0 && o->p_uncond <= 1))
    bad = "--p-uncond: give a probability in [0, 1]";
  else if (!(o->checkpoint_minutes >= 0))
    bad = "--checkpoint-minutes: give 0 or more";
  else if (o->resume && o->checkpoint == NULL)
    bad = "--resume needs --checkpoint PATH";
  else if (a->threads < 0 || a->threads > DF_MAX_THREADS)
    bad = "--threads: give 0 (all cores) to " G_STRINGIFY (DF_MAX_THREADS);
  else if (GIVEN (a->image_channels) && a->image_channels != 1
           && a->image_channels != 3)
    bad = "--image-channels: give 1 (gray) or 3 (RGB)";
  else if (a->timesteps < 1)
    bad = "--timesteps: give at least 1";

  if (bad)
    g_set_error_literal (error, CLI_ERROR, CLI_ERROR_INVALID, bad);
  return bad == NULL;
}

int
cli_train (int argc, char **argv)
{
  TrainArgs a = { 0 };
  DfTrainOptions o;
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
      "Attention per block, 0 or 1 (default 0,0,1)", "A1,A2,..." },
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
    { "steps", 's', 0, G_OPTION_ARG_INT, &o.steps, "Optimiser steps", "N" },
    { "batch", 'b', 0, G_OPTION_ARG_INT, &o.batch, "Images per step", "N" },
    { "lr", 0, 0, G_OPTION_ARG_DOUBLE, &o.lr, "Peak learning rate", "LR" },
    { "warmup", 0, 0, G_OPTION_ARG_INT, &o.warmup,
      "Linear warm-up steps", "N" },
    { "lr-schedule", 0, 0, G_OPTION_ARG_STRING, &a.lr_schedule,
      "After warm-up: constant or cosine", "NAME" },
    { "weight-decay", 0, 0, G_OPTION_ARG_DOUBLE, &o.weight_decay,
      "AdamW decoupled weight decay", "WD" },
    { "ema", 0, 0, G_OPTION_ARG_DOUBLE, &o.ema_decay,
      "EMA decay of the shipped weights", "DECAY" },
    { "grad-clip", 0, 0, G_OPTION_ARG_DOUBLE, &o.grad_clip,
      "Clip the global gradient norm (0: off)", "NORM" },
    { "p-uncond", 0, 0, G_OPTION_ARG_DOUBLE, &o.p_uncond,
      "Probability of dropping the label to the unconditional class", "P" },
    { "hflip", 0, 0, G_OPTION_ARG_NONE, &o.hflip,
      "Random horizontal flips", NULL },
    { "seed", 0, 0, G_OPTION_ARG_STRING, &a.seed,
      "Seed of the initial weights and of every random draw", "N" },
    { "checkpoint", 0, 0, G_OPTION_ARG_FILENAME, &a.checkpoint,
      "Checkpoint file (written atomically)", "PATH" },
    { "checkpoint-minutes", 0, 0, G_OPTION_ARG_DOUBLE, &o.checkpoint_minutes,
      "Minutes between checkpoints", "M" },
    { "resume", 0, 0, G_OPTION_ARG_NONE, &o.resume,
      "Continue from the checkpoint if it exists", NULL },
    { "log", 0, 0, G_OPTION_ARG_FILENAME, &a.log,
      "Append step,loss,smoothed_loss,lr,img_per_s rows to this CSV", "CSV" },
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
    o.p_uncond = 0.1;
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
  if (!g_file_test (a.data, G_FILE_TEST_IS_DIR))
    {
      g_set_error (&error, CLI_ERROR, CLI_ERROR_IO,
                   "--data %s: no such folder", a.data);
      goto out;
    }
  if (!cli_check_output_file ("--out", a.out, &error)
      || !cli_check_output_file ("--checkpoint", a.checkpoint, &error)
      || !cli_check_output_file ("--log", a.log, &error)
      || !cli_check_output_file ("--plot", a.plot, &error))
    goto out;

  /* The network and schedule (the class count comes from the data). */
  channels = GIVEN (a.image_channels) ? a.image_channels : 0;
  if (channels == 0 && a.config == NULL)
    channels = cli_is_idx_folder (a.data, "train") ? 1 : 3;
  if (!build_config (&a, channels, &cfg, &error))
    goto out;
  sched = df_schedule_new (kind, a.timesteps, 0, 0, &error);
  if (sched == NULL)
    goto out;

  data = df_dataset_load (a.data, "train", cfg.sample_size, cfg.in_channels,
                          &error);
  if (data == NULL)
    goto out;
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
  if (!df_unet_config_validate (&cfg, &error))
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
      fprintf (stderr, "train: %s, %" G_GSIZE_FORMAT " parameters, %d images "
               "of %d x %d x %d, %d classes", classifier ? "noisy classifier"
               : "UNet", df_unet_param_count (df_model_net (m)), data->n,
               data->c, data->h, data->w, data->num_classes);
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
  return ok ? 0 : cli_fail (error);
}
