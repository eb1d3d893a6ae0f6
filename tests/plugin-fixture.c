/* plugin-fixture.c: see plugin-fixture.h. */
#include "plugin-fixture.h"

#include "model.h"

static const char *const class_names[] = { "T-shirt", "Trouser", "Sneaker",
                                           NULL };
static const char *const other_names[] = { "apple", "banana", "cherry", NULL };

static void
tiny_config (DfUNetConfig *cfg)
{
  df_unet_config_init (cfg);
  cfg->sample_size = FIXTURE_SIZE;
  cfg->in_channels = cfg->out_channels = 1;
  cfg->n_blocks = 2;
  cfg->block_out_channels[0] = 16;
  cfg->block_out_channels[1] = 32;
  cfg->down_attention[0] = FALSE;
  cfg->down_attention[1] = TRUE;
  cfg->up_attention[0] = TRUE;
  cfg->up_attention[1] = FALSE;
  cfg->layers_per_block = 1;
  cfg->norm_num_groups = 8;
  cfg->attention_head_dim = 8;
}

static gboolean
write_named (const char *path, const DfUNetConfig *cfg, gboolean classifier,
             const DfSchedule *s, const char *const *names, int uncond,
             GError **error)
{
  DfModel *m = df_model_new (cfg, classifier, s, names, uncond, error);
  gboolean ok;

  if (m == NULL)
    return FALSE;
  df_unet_init (df_model_net (m), classifier ? 2 : 1);
  ok = df_model_save (m, path, error);
  df_model_free (m);
  return ok;
}

static gboolean
write_one (const char *path, const DfUNetConfig *cfg, gboolean classifier,
           const DfSchedule *s, int uncond, GError **error)
{
  return write_named (path, cfg, classifier, s, class_names, uncond, error);
}

gboolean
fixture_write_models (const char *dir, GError **error)
{
  DfUNetConfig cfg, ccfg;
  DfSchedule *s;
  char *unet, *clf;
  gboolean ok;

  s = df_schedule_new (DF_BETA_LINEAR, FIXTURE_T, 0, 0, error);
  if (s == NULL)
    return FALSE;

  /* Class-conditional with an unconditional class, like the shipped one. */
  tiny_config (&cfg);
  cfg.num_class_embeds = FIXTURE_N_CLASSES + 1;
  ccfg = cfg;
  ccfg.num_class_embeds = 0;
  ccfg.classifier_classes = FIXTURE_N_CLASSES;

  unet = g_build_filename (dir, "fashion-mnist.safetensors", NULL);
  clf = g_build_filename (dir, "fashion-mnist-classifier.safetensors", NULL);
  ok = write_one (unet, &cfg, FALSE, s, FIXTURE_N_CLASSES, error)
       && write_one (clf, &ccfg, TRUE, s, -1, error);
  g_free (unet);
  g_free (clf);
  df_schedule_free (s);
  return ok;
}

gboolean
fixture_write_other_classifier (const char *path, GError **error)
{
  DfUNetConfig cfg;
  DfSchedule *s = df_schedule_new (DF_BETA_LINEAR, FIXTURE_T, 0, 0, error);
  gboolean ok;

  if (s == NULL)
    return FALSE;
  tiny_config (&cfg);
  cfg.classifier_classes = FIXTURE_N_CLASSES;
  ok = write_named (path, &cfg, TRUE, s, other_names, -1, error);
  df_schedule_free (s);
  return ok;
}
