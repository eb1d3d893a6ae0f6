/* unet.h: diffusers' UNet2DModel, and the noisy classifier made of its down
 * path and mid block.
 *
 * Legend: N batch, C channels, H, W image size, E time embedding width
 * (4 x block_out_channels[0]).
 */
#pragma once

#include <glib.h>
#include <json-glib/json-glib.h>

#include "tensor.h"

G_BEGIN_DECLS

#define DF_MAX_BLOCKS 8

#define DF_UNET_ERROR (df_unet_error_quark ())
GQuark df_unet_error_quark (void);

typedef enum {
  DF_UNET_ERROR_CONFIG       /* a config value the engine cannot build */
} DfUNetError;

typedef struct {
  int      sample_size;
  int      in_channels, out_channels;
  int      n_blocks;
  int      block_out_channels[DF_MAX_BLOCKS];
  gboolean down_attention[DF_MAX_BLOCKS];   /* AttnDownBlock2D */
  gboolean up_attention[DF_MAX_BLOCKS];     /* AttnUpBlock2D, in up order */
  int      layers_per_block;
  int      norm_num_groups;
  double   norm_eps;
  int      attention_head_dim;              /* 0: one head per block */
  int      num_class_embeds;                /* 0: unconditional */
  int      downsample_padding;
  gboolean flip_sin_to_cos;
  double   freq_shift;
  gboolean mid_attention;                   /* add_attention */
  double   mid_block_scale_factor;
  /* classifier only: number of output classes (0 for a UNet). */
  int      classifier_classes;
} DfUNetConfig;

/* diffusers' defaults for UNet2DModel. */
void      df_unet_config_init       (DfUNetConfig *cfg);
/* Read a diffusers config object: cfg starts from the defaults above, keys
 * present override them (unknown keys ignored, unsupported values such as
 * another act_fn or time_embedding_type are an error naming the key). */
gboolean  df_unet_config_from_json  (DfUNetConfig *cfg, JsonObject *obj,
                                     GError **error);
/* diffusers' keys, so the file loads in diffusers too. */
JsonNode *df_unet_config_to_json    (const DfUNetConfig *cfg);
gboolean  df_unet_config_validate   (const DfUNetConfig *cfg, GError **error);

typedef struct {
  char     *name;      /* diffusers' name: "down_blocks.0.resnets.0.conv1.weight" */
  DfTensor *tensor;
} DfParam;

typedef struct _DfUNet DfUNet;

/* Parameters zeroed; is_classifier builds the classifier network. */
DfUNet   *df_unet_new               (const DfUNetConfig *cfg,
                                     gboolean is_classifier, GError **error);
void      df_unet_free              (DfUNet *net);
const DfUNetConfig *df_unet_config  (DfUNet *net);
gboolean  df_unet_is_classifier     (DfUNet *net);
/* Fixed-seed initialisation like PyTorch's defaults (uniform +-1/sqrt(fan_in)
 * for conv and linear, ones and zeros for norms, N(0,1) for embeddings). */
void      df_unet_init              (DfUNet *net, guint64 seed);
/* All parameters, in a fixed order (the order they are created in). */
const DfParam *df_unet_params       (DfUNet *net, int *n_params);
gsize     df_unet_param_count       (DfUNet *net);
DfTensor *df_unet_find_param        (DfUNet *net, const char *name);

/* UNet: x [N,Cin,H,W], t[N] timesteps, labels[N] or NULL -> eps [N,Cout,H,W].
 * Classifier: -> logits [N,K].  The result belongs to g. */
DfTensor *df_unet_forward           (DfUNet *net, DfGraph *g, DfTensor *x,
                                     const float *t, const int *labels);
/* Floating-point operations of one forward pass for one image. */
double    df_unet_flops             (DfUNet *net, int h, int w);

G_END_DECLS
