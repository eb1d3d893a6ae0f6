/* unet.c: diffusers' UNet2DModel and the noisy classifier, built from the
 * operations of tensor.h (so the recording graph gives the backward pass).
 *
 * Legend: N batch, C channels, H, W image size, L tokens (H*W), E time
 * embedding width (4 C0), C0 = block_out_channels[0], K classes.
 *
 * The network, as diffusers builds it:
 *   temb = linear_2 (silu (linear_1 (sinusoid (t)))) [+ class_embedding]
 *   x = conv_in (x); skips = [x]
 *   down block i: resnets (+ attentions), each output pushed on skips;
 *                 a stride-2 conv except on the last block, pushed too
 *   mid: resnet, attention (add_attention), resnet
 *   up block i (channels reversed): layers_per_block + 1 resnets, each on
 *                 concat (x, skips.pop ()), (+ attentions), then a nearest
 *                 x2 + conv except on the last block
 *   out = conv_out (silu (conv_norm_out (x)))
 * The classifier stops after the mid block: out.linear (mean_hw (silu
 * (out.norm (x)))).
 */
#include <math.h>
#include <string.h>

#include "rng.h"
#include "unet.h"

G_DEFINE_QUARK (df-unet-error-quark, df_unet_error)

typedef enum { INIT_FAN_IN, INIT_ONES, INIT_ZEROS, INIT_NORMAL } InitKind;

typedef struct {
  InitKind kind;
  int      fan_in;
} ParamInit;

typedef struct {
  DfTensor *w, *b;
} Pair;

/* ResnetBlock2D with resnet_time_scale_shift "default". */
typedef struct {
  int   cin, cout;
  float inv_scale;          /* 1 / output_scale_factor */
  Pair  norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut;
} Resnet;

/* diffusers' Attention as the deprecated attention block builds it. */
typedef struct {
  int   channels, heads;
  float inv_scale;          /* 1 / rescale_output_factor */
  Pair  group_norm, to_q, to_k, to_v, to_out;
} Attn;

typedef struct {
  int     n_layers;
  Resnet *resnets;          /* [n_layers] */
  Attn   *attentions;       /* [n_layers] or NULL */
  Pair    sampler;          /* downsamplers.0.conv / upsamplers.0.conv */
  gboolean has_sampler;
} Block;

struct _DfUNet {
  DfUNetConfig cfg;
  gboolean     classifier;

  GArray      *params;      /* DfParam, in creation order */
  GArray      *inits;       /* ParamInit, parallel to params */
  GHashTable  *by_name;     /* name -> DfTensor*, names owned by params */

  double      *freqs;       /* [C0/2] sinusoid frequencies */

  Pair         conv_in, linear_1, linear_2;
  DfTensor    *class_embedding;      /* [num_class_embeds, E] or NULL */
  Block        down[DF_MAX_BLOCKS], up[DF_MAX_BLOCKS];
  Resnet       mid_resnets[2];
  Attn         mid_attn;
  Pair         conv_norm_out, conv_out;
  Pair         head_norm, head_linear;           /* classifier */
};

/* ---- config ---- */

void
df_unet_config_init (DfUNetConfig *cfg)
{
  static const int channels[] = { 224, 448, 672, 896 };

  g_return_if_fail (cfg != NULL);

  memset (cfg, 0, sizeof *cfg);
  cfg->sample_size = 0;                  /* diffusers: None */
  cfg->in_channels = 3;
  cfg->out_channels = 3;
  cfg->n_blocks = 4;
  for (int i = 0; i < 4; i++)
    {
      cfg->block_out_channels[i] = channels[i];
      /* DownBlock2D, AttnDownBlock2D x3 / AttnUpBlock2D x3, UpBlock2D */
      cfg->down_attention[i] = i > 0;
      cfg->up_attention[i] = i < 3;
    }
  cfg->layers_per_block = 2;
  cfg->norm_num_groups = 32;
  cfg->norm_eps = 1e-5;
  cfg->attention_head_dim = 8;
  cfg->num_class_embeds = 0;
  cfg->downsample_padding = 1;
  cfg->flip_sin_to_cos = TRUE;
  cfg->freq_shift = 0;
  cfg->mid_attention = TRUE;
  cfg->mid_block_scale_factor = 1;
  cfg->classifier_classes = 0;
}

static gboolean
config_error (GError **error, const char *key, const char *fmt, ...)
  G_GNUC_PRINTF (3, 4);

static gboolean
config_error (GError **error, const char *key, const char *fmt, ...)
{
  va_list ap;
  char *why;

  va_start (ap, fmt);
  why = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  g_set_error (error, DF_UNET_ERROR, DF_UNET_ERROR_CONFIG,
               "UNet config key \"%s\": %s", key, why);
  g_free (why);
  return FALSE;
}

/* A member that is absent or null: the default stands. */
static gboolean
has_value (JsonObject *obj, const char *key)
{
  JsonNode *n = json_object_get_member (obj, key);

  return n != NULL && !JSON_NODE_HOLDS_NULL (n);
}

static gboolean
is_null (JsonObject *obj, const char *key)
{
  JsonNode *n = json_object_get_member (obj, key);

  return n != NULL && JSON_NODE_HOLDS_NULL (n);
}

static gboolean
get_number (JsonObject *obj, const char *key, double *out, GError **error)
{
  JsonNode *n = json_object_get_member (obj, key);
  GType t;

  if (n == NULL || JSON_NODE_HOLDS_NULL (n))
    return TRUE;
  t = JSON_NODE_HOLDS_VALUE (n) ? json_node_get_value_type (n) : G_TYPE_NONE;
  if (t != G_TYPE_INT64 && t != G_TYPE_DOUBLE)
    return config_error (error, key, "expected a number");
  *out = json_node_get_double (n);
  return TRUE;
}

static gboolean
get_int (JsonObject *obj, const char *key, int *out, GError **error)
{
  double v = *out;

  if (!get_number (obj, key, &v, error))
    return FALSE;
  if (v != floor (v) || fabs (v) > G_MAXINT)
    return config_error (error, key, "expected an integer, got %g", v);
  *out = (int) v;
  return TRUE;
}

static gboolean
get_bool (JsonObject *obj, const char *key, gboolean *out, GError **error)
{
  JsonNode *n = json_object_get_member (obj, key);

  if (n == NULL || JSON_NODE_HOLDS_NULL (n))
    return TRUE;
  if (!JSON_NODE_HOLDS_VALUE (n)
      || json_node_get_value_type (n) != G_TYPE_BOOLEAN)
    return config_error (error, key, "expected true or false");
  *out = json_node_get_boolean (n);
  return TRUE;
}

/* A string key that must hold one of the values in allowed (NULL-ended);
 * absent is fine, null only if null_ok. */
static gboolean
check_string (JsonObject *obj, const char *key, gboolean null_ok,
              const char *const *allowed, GError **error)
{
  JsonNode *n = json_object_get_member (obj, key);
  const char *s;

  if (n == NULL)
    return TRUE;
  if (JSON_NODE_HOLDS_NULL (n))
    {
      if (null_ok)
        return TRUE;
      return config_error (error, key, "null is not supported; use \"%s\"",
                           allowed[0]);
    }
  if (!JSON_NODE_HOLDS_VALUE (n)
      || json_node_get_value_type (n) != G_TYPE_STRING)
    return config_error (error, key, "expected a string");
  s = json_node_get_string (n);
  for (int i = 0; allowed != NULL && allowed[i] != NULL; i++)
    if (strcmp (s, allowed[i]) == 0)
      return TRUE;
  if (allowed == NULL)
    return config_error (error, key, "\"%s\" is not supported; only null "
                         "is", s);
  return config_error (error, key, "\"%s\" is not supported; the engine "
                       "implements \"%s\" only", s, allowed[0]);
}

static gboolean
get_array (JsonObject *obj, const char *key, JsonArray **out, GError **error)
{
  JsonNode *n = json_object_get_member (obj, key);

  *out = NULL;
  if (n == NULL || JSON_NODE_HOLDS_NULL (n))
    return TRUE;
  if (!JSON_NODE_HOLDS_ARRAY (n))
    return config_error (error, key, "expected an array");
  *out = json_node_get_array (n);
  if (json_array_get_length (*out) < 1
      || json_array_get_length (*out) > DF_MAX_BLOCKS)
    return config_error (error, key, "expected 1 to %d entries, got %u",
                         DF_MAX_BLOCKS, json_array_get_length (*out));
  return TRUE;
}

/* down_block_types / up_block_types: plain or attention blocks. */
static gboolean
get_block_types (JsonObject *obj, const char *key, const char *plain,
                 const char *attn, int *n, gboolean *attention,
                 GError **error)
{
  JsonArray *a;

  if (!get_array (obj, key, &a, error))
    return FALSE;
  if (a == NULL)
    return TRUE;
  *n = json_array_get_length (a);
  for (int i = 0; i < *n; i++)
    {
      JsonNode *e = json_array_get_element (a, i);
      const char *s;

      if (!JSON_NODE_HOLDS_VALUE (e)
          || json_node_get_value_type (e) != G_TYPE_STRING)
        return config_error (error, key, "entry %d is not a string", i);
      s = json_node_get_string (e);
      if (strcmp (s, plain) == 0)
        attention[i] = FALSE;
      else if (strcmp (s, attn) == 0)
        attention[i] = TRUE;
      else
        return config_error (error, key, "entry %d, \"%s\", is not "
                             "supported; use \"%s\" or \"%s\"", i, s, plain,
                             attn);
    }
  return TRUE;
}

gboolean
df_unet_config_from_json (DfUNetConfig *cfg, JsonObject *obj, GError **error)
{
  static const char *const silu[] = { "silu", "swish", NULL };
  static const char *const positional[] = { "positional", NULL };
  static const char *const dflt[] = { "default", NULL };
  static const char *const conv[] = { "conv", NULL };
  static const char *const mid[] = { "UNetMidBlock2D", NULL };
  JsonArray *a;
  int n_down = -1, n_up = -1, n_channels = -1;
  gboolean center = FALSE;

  g_return_val_if_fail (cfg != NULL, FALSE);
  g_return_val_if_fail (obj != NULL, FALSE);

  df_unet_config_init (cfg);

  /* What the engine cannot build is refused by name. */
  if (!check_string (obj, "act_fn", FALSE, silu, error)
      || !check_string (obj, "time_embedding_type", FALSE, positional, error)
      || !check_string (obj, "resnet_time_scale_shift", FALSE, dflt, error)
      || !check_string (obj, "downsample_type", FALSE, conv, error)
      || !check_string (obj, "upsample_type", FALSE, conv, error)
      || !check_string (obj, "mid_block_type", FALSE, mid, error)
      || !check_string (obj, "class_embed_type", TRUE, NULL, error)
      || !get_bool (obj, "center_input_sample", &center, error))
    return FALSE;
  if (center)
    return config_error (error, "center_input_sample", "true is not "
                         "supported; the engine expects samples in [-1, 1] "
                         "(false)");

  /* sample_size: an int, or diffusers' [h, w] when square. */
  if (has_value (obj, "sample_size")
      && JSON_NODE_HOLDS_ARRAY (json_object_get_member (obj, "sample_size")))
    {
      a = json_object_get_array_member (obj, "sample_size");
      if (json_array_get_length (a) != 2
          || json_array_get_int_element (a, 0)
             != json_array_get_int_element (a, 1))
        return config_error (error, "sample_size", "only square samples "
                             "are supported");
      cfg->sample_size = json_array_get_int_element (a, 0);
    }
  else if (!get_int (obj, "sample_size", &cfg->sample_size, error))
    return FALSE;

  if (!get_int (obj, "in_channels", &cfg->in_channels, error)
      || !get_int (obj, "out_channels", &cfg->out_channels, error)
      || !get_int (obj, "layers_per_block", &cfg->layers_per_block, error)
      || !get_int (obj, "norm_num_groups", &cfg->norm_num_groups, error)
      || !get_number (obj, "norm_eps", &cfg->norm_eps, error)
      || !get_int (obj, "downsample_padding", &cfg->downsample_padding,
                   error)
      || !get_bool (obj, "flip_sin_to_cos", &cfg->flip_sin_to_cos, error)
      || !get_number (obj, "freq_shift", &cfg->freq_shift, error)
      || !get_bool (obj, "add_attention", &cfg->mid_attention, error)
      || !get_number (obj, "mid_block_scale_factor",
                      &cfg->mid_block_scale_factor, error)
      || !get_int (obj, "classifier_classes", &cfg->classifier_classes,
                   error))
    return FALSE;

  /* Keys whose null means something other than the default. */
  if (is_null (obj, "attention_head_dim"))
    cfg->attention_head_dim = 0;
  else if (!get_int (obj, "attention_head_dim", &cfg->attention_head_dim,
                     error))
    return FALSE;
  if (!get_int (obj, "num_class_embeds", &cfg->num_class_embeds, error))
    return FALSE;

  /* Blocks: channels and both type lists must agree in length. */
  if (!get_array (obj, "block_out_channels", &a, error))
    return FALSE;
  if (a != NULL)
    {
      n_channels = json_array_get_length (a);
      for (int i = 0; i < n_channels; i++)
        {
          JsonNode *e = json_array_get_element (a, i);

          if (!JSON_NODE_HOLDS_VALUE (e)
              || json_node_get_value_type (e) != G_TYPE_INT64)
            return config_error (error, "block_out_channels", "entry %d is "
                                 "not an integer", i);
          cfg->block_out_channels[i] = json_node_get_int (e);
        }
      cfg->n_blocks = n_channels;
    }
  if (!get_block_types (obj, "down_block_types", "DownBlock2D",
                        "AttnDownBlock2D", &n_down, cfg->down_attention,
                        error)
      || !get_block_types (obj, "up_block_types", "UpBlock2D",
                           "AttnUpBlock2D", &n_up, cfg->up_attention, error))
    return FALSE;
  if (n_down < 0)
    n_down = 4;
  if (n_up < 0)
    n_up = 4;
  if (n_down != cfg->n_blocks)
    return config_error (error, "down_block_types", "%d entries for %d "
                         "block_out_channels", n_down, cfg->n_blocks);
  if (n_up != cfg->n_blocks)
    return config_error (error, "up_block_types", "%d entries for %d "
                         "block_out_channels", n_up, cfg->n_blocks);

  /* Optional keys that must say what the engine does anyway. */
  if (has_value (obj, "time_embedding_dim"))
    {
      int e = 0;

      if (!get_int (obj, "time_embedding_dim", &e, error))
        return FALSE;
      if (e != 4 * cfg->block_out_channels[0])
        return config_error (error, "time_embedding_dim", "%d is not "
                             "supported; use null (4 x block_out_channels[0])",
                             e);
    }
  if (has_value (obj, "attn_norm_num_groups"))
    {
      int groups = 0;

      if (!get_int (obj, "attn_norm_num_groups", &groups, error))
        return FALSE;
      if (groups != cfg->norm_num_groups)
        return config_error (error, "attn_norm_num_groups", "%d is not "
                             "supported; use null (norm_num_groups)", groups);
    }
  return TRUE;
}

JsonNode *
df_unet_config_to_json (const DfUNetConfig *cfg)
{
  JsonBuilder *b;
  JsonNode *node;

  g_return_val_if_fail (cfg != NULL, NULL);

  b = json_builder_new ();
  json_builder_begin_object (b);

#define KEY(k) json_builder_set_member_name (b, k)
  KEY ("_class_name");
  json_builder_add_string_value (b, "UNet2DModel");
  KEY ("sample_size");
  if (cfg->sample_size > 0)
    json_builder_add_int_value (b, cfg->sample_size);
  else
    json_builder_add_null_value (b);
  KEY ("in_channels");
  json_builder_add_int_value (b, cfg->in_channels);
  KEY ("out_channels");
  json_builder_add_int_value (b, cfg->out_channels);
  KEY ("center_input_sample");
  json_builder_add_boolean_value (b, FALSE);
  KEY ("time_embedding_type");
  json_builder_add_string_value (b, "positional");
  /* diffusers types freq_shift as an int: keep it one when it is. */
  KEY ("freq_shift");
  if (cfg->freq_shift == floor (cfg->freq_shift))
    json_builder_add_int_value (b, (gint64) cfg->freq_shift);
  else
    json_builder_add_double_value (b, cfg->freq_shift);
  KEY ("flip_sin_to_cos");
  json_builder_add_boolean_value (b, cfg->flip_sin_to_cos);

  KEY ("down_block_types");
  json_builder_begin_array (b);
  for (int i = 0; i < cfg->n_blocks; i++)
    json_builder_add_string_value (b, cfg->down_attention[i]
                                      ? "AttnDownBlock2D" : "DownBlock2D");
  json_builder_end_array (b);
  KEY ("up_block_types");
  json_builder_begin_array (b);
  for (int i = 0; i < cfg->n_blocks; i++)
    json_builder_add_string_value (b, cfg->up_attention[i]
                                      ? "AttnUpBlock2D" : "UpBlock2D");
  json_builder_end_array (b);
  KEY ("block_out_channels");
  json_builder_begin_array (b);
  for (int i = 0; i < cfg->n_blocks; i++)
    json_builder_add_int_value (b, cfg->block_out_channels[i]);
  json_builder_end_array (b);

  KEY ("layers_per_block");
  json_builder_add_int_value (b, cfg->layers_per_block);
  KEY ("mid_block_scale_factor");
  json_builder_add_double_value (b, cfg->mid_block_scale_factor);
  KEY ("downsample_padding");
  json_builder_add_int_value (b, cfg->downsample_padding);
  KEY ("act_fn");
  json_builder_add_string_value (b, "silu");
  KEY ("attention_head_dim");
  if (cfg->attention_head_dim > 0)
    json_builder_add_int_value (b, cfg->attention_head_dim);
  else
    json_builder_add_null_value (b);
  KEY ("norm_num_groups");
  json_builder_add_int_value (b, cfg->norm_num_groups);
  KEY ("norm_eps");
  json_builder_add_double_value (b, cfg->norm_eps);
  KEY ("resnet_time_scale_shift");
  json_builder_add_string_value (b, "default");
  KEY ("add_attention");
  json_builder_add_boolean_value (b, cfg->mid_attention);
  KEY ("class_embed_type");
  json_builder_add_null_value (b);
  KEY ("num_class_embeds");
  if (cfg->num_class_embeds > 0)
    json_builder_add_int_value (b, cfg->num_class_embeds);
  else
    json_builder_add_null_value (b);
  if (cfg->classifier_classes > 0)
    {
      KEY ("classifier_classes");
      json_builder_add_int_value (b, cfg->classifier_classes);
    }
#undef KEY

  json_builder_end_object (b);
  node = json_builder_get_root (b);
  g_object_unref (b);
  return node;
}

gboolean
df_unet_config_validate (const DfUNetConfig *cfg, GError **error)
{
  int c0, factor;

  g_return_val_if_fail (cfg != NULL, FALSE);

  if (cfg->n_blocks < 1 || cfg->n_blocks > DF_MAX_BLOCKS)
    return config_error (error, "block_out_channels", "%d blocks; the "
                         "engine supports 1 to %d", cfg->n_blocks,
                         DF_MAX_BLOCKS);
  if (cfg->in_channels < 1)
    return config_error (error, "in_channels", "%d must be at least 1",
                         cfg->in_channels);
  if (cfg->out_channels < 1)
    return config_error (error, "out_channels", "%d must be at least 1",
                         cfg->out_channels);
  if (cfg->layers_per_block < 1)
    return config_error (error, "layers_per_block", "%d must be at least 1",
                         cfg->layers_per_block);
  if (cfg->norm_num_groups < 1)
    return config_error (error, "norm_num_groups", "%d must be at least 1",
                         cfg->norm_num_groups);
  if (!(cfg->norm_eps > 0))
    return config_error (error, "norm_eps", "%g must be positive",
                         cfg->norm_eps);

  for (int i = 0; i < cfg->n_blocks; i++)
    {
      int c = cfg->block_out_channels[i];
      gboolean block_attn = cfg->down_attention[i]
                            || cfg->up_attention[cfg->n_blocks - 1 - i];
      gboolean attn = block_attn
                      || (i == cfg->n_blocks - 1 && cfg->mid_attention);

      if (c < 1 || c % cfg->norm_num_groups != 0)
        return config_error (error, "block_out_channels", "entry %d (%d) is "
                             "not a positive multiple of norm_num_groups "
                             "(%d)", i, c, cfg->norm_num_groups);
      if (attn && cfg->attention_head_dim > 0
          && c % cfg->attention_head_dim != 0)
        return config_error (error, "attention_head_dim", "%d does not "
                             "divide the %d channels of block %d, which has "
                             "attention%s", cfg->attention_head_dim, c, i,
                             block_attn ? "" : " (the mid block's)");
    }
  if (cfg->attention_head_dim < 0)
    return config_error (error, "attention_head_dim", "%d must be positive "
                         "or null", cfg->attention_head_dim);

  factor = 1 << (cfg->n_blocks - 1);
  if (cfg->sample_size < 0 || cfg->sample_size % factor != 0)
    return config_error (error, "sample_size", "%d is not a multiple of "
                         "2^(blocks - 1) = %d", cfg->sample_size, factor);
  if (cfg->num_class_embeds < 0)
    return config_error (error, "num_class_embeds", "%d must be positive or "
                         "null", cfg->num_class_embeds);
  if (cfg->downsample_padding != 0 && cfg->downsample_padding != 1)
    return config_error (error, "downsample_padding", "%d: only 0 and 1 "
                         "halve the image exactly", cfg->downsample_padding);

  c0 = cfg->block_out_channels[0];
  if (c0 < 2 || c0 / 2 == cfg->freq_shift)
    return config_error (error, "freq_shift", "%g leaves no frequencies for "
                         "%d embedding channels", cfg->freq_shift, c0);
  if (!(cfg->mid_block_scale_factor > 0))
    return config_error (error, "mid_block_scale_factor", "%g must be "
                         "positive", cfg->mid_block_scale_factor);
  if (cfg->classifier_classes < 0)
    return config_error (error, "classifier_classes", "%d must not be "
                         "negative", cfg->classifier_classes);
  return TRUE;
}

/* ---- building ---- */

static DfTensor *
add_param (DfUNet *net, int ndim, const int *shape, InitKind kind,
           int fan_in, char *name /* taken */)
{
  DfParam p;
  ParamInit init = { kind, fan_in };

  p.name = name;
  p.tensor = df_tensor_new (ndim, shape);
  g_array_append_val (net->params, p);
  g_array_append_val (net->inits, init);
  g_hash_table_insert (net->by_name, p.name, p.tensor);
  return p.tensor;
}

static Pair
conv_params (DfUNet *net, const char *prefix, int cin, int cout, int k)
{
  int ws[4] = { cout, cin, k, k };
  int bs[1] = { cout };
  Pair p;

  p.w = add_param (net, 4, ws, INIT_FAN_IN, cin * k * k,
                   g_strconcat (prefix, ".weight", NULL));
  p.b = add_param (net, 1, bs, INIT_FAN_IN, cin * k * k,
                   g_strconcat (prefix, ".bias", NULL));
  return p;
}

static Pair
linear_params (DfUNet *net, const char *prefix, int in, int out)
{
  int ws[2] = { out, in };
  int bs[1] = { out };
  Pair p;

  p.w = add_param (net, 2, ws, INIT_FAN_IN, in,
                   g_strconcat (prefix, ".weight", NULL));
  p.b = add_param (net, 1, bs, INIT_FAN_IN, in,
                   g_strconcat (prefix, ".bias", NULL));
  return p;
}

static Pair
norm_params (DfUNet *net, const char *prefix, int c)
{
  int s[1] = { c };
  Pair p;

  p.w = add_param (net, 1, s, INIT_ONES, 0,
                   g_strconcat (prefix, ".weight", NULL));
  p.b = add_param (net, 1, s, INIT_ZEROS, 0,
                   g_strconcat (prefix, ".bias", NULL));
  return p;
}

static void
build_resnet (DfUNet *net, Resnet *r, const char *prefix, int cin, int cout,
              double output_scale_factor)
{
  int e = 4 * net->cfg.block_out_channels[0];
  char *pre;

  r->cin = cin;
  r->cout = cout;
  r->inv_scale = (float) (1.0 / output_scale_factor);

#define P(leaf) (g_free (pre), pre = g_strconcat (prefix, leaf, NULL))
  pre = NULL;
  r->norm1 = norm_params (net, P (".norm1"), cin);
  r->conv1 = conv_params (net, P (".conv1"), cin, cout, 3);
  r->time_emb_proj = linear_params (net, P (".time_emb_proj"), e, cout);
  r->norm2 = norm_params (net, P (".norm2"), cout);
  r->conv2 = conv_params (net, P (".conv2"), cout, cout, 3);
  if (cin != cout)
    r->conv_shortcut = conv_params (net, P (".conv_shortcut"), cin, cout, 1);
#undef P
  g_free (pre);
}

static void
build_attn (DfUNet *net, Attn *a, const char *prefix, int c,
            double rescale_output_factor)
{
  int head_dim = net->cfg.attention_head_dim > 0
                 ? net->cfg.attention_head_dim : c;
  char *pre = NULL;

  a->channels = c;
  a->heads = c / head_dim;
  a->inv_scale = (float) (1.0 / rescale_output_factor);

#define P(leaf) (g_free (pre), pre = g_strconcat (prefix, leaf, NULL))
  a->group_norm = norm_params (net, P (".group_norm"), c);
  a->to_q = linear_params (net, P (".to_q"), c, c);
  a->to_k = linear_params (net, P (".to_k"), c, c);
  a->to_v = linear_params (net, P (".to_v"), c, c);
  a->to_out = linear_params (net, P (".to_out.0"), c, c);
#undef P
  g_free (pre);
}

static void
build_block (Block *blk, int n_layers, gboolean attention)
{
  blk->n_layers = n_layers;
  blk->resnets = g_new0 (Resnet, n_layers);
  blk->attentions = attention ? g_new0 (Attn, n_layers) : NULL;
}

static void
param_free (gpointer p)
{
  DfParam *param = p;

  g_free (param->name);
  df_tensor_free (param->tensor);
}

DfUNet *
df_unet_new (const DfUNetConfig *cfg, gboolean is_classifier, GError **error)
{
  const int *boc;
  DfUNet *net;
  int nb, e, half, out_ch;
  char *pre;

  g_return_val_if_fail (cfg != NULL, NULL);

  if (!df_unet_config_validate (cfg, error))
    return NULL;
  if (is_classifier && cfg->classifier_classes < 1)
    {
      config_error (error, "classifier_classes", "a classifier needs at "
                    "least one class");
      return NULL;
    }
  if (is_classifier && cfg->num_class_embeds > 0)
    {
      config_error (error, "num_class_embeds", "a classifier takes no class "
                    "embedding; use null");
      return NULL;
    }

  net = g_new0 (DfUNet, 1);
  net->cfg = *cfg;
  net->classifier = is_classifier;
  net->params = g_array_new (FALSE, FALSE, sizeof (DfParam));
  g_array_set_clear_func (net->params, param_free);
  net->inits = g_array_new (FALSE, FALSE, sizeof (ParamInit));
  net->by_name = g_hash_table_new (g_str_hash, g_str_equal);

  boc = cfg->block_out_channels;
  nb = cfg->n_blocks;
  e = 4 * boc[0];

  /* Sinusoid frequencies exp(-log(10000) i / (half - freq_shift)). */
  half = boc[0] / 2;
  net->freqs = g_new (double, half);
  for (int i = 0; i < half; i++)
    net->freqs[i] = exp (-log (10000.0) * i / (half - cfg->freq_shift));

  /* Stem and time embedding. */
  net->conv_in = conv_params (net, "conv_in", cfg->in_channels, boc[0], 3);
  net->linear_1 = linear_params (net, "time_embedding.linear_1", boc[0], e);
  net->linear_2 = linear_params (net, "time_embedding.linear_2", e, e);
  if (cfg->num_class_embeds > 0)
    {
      int s[2] = { cfg->num_class_embeds, e };

      net->class_embedding = add_param (net, 2, s, INIT_NORMAL, 0,
                                        g_strdup ("class_embedding.weight"));
    }

  /* Down blocks: resnets (+ attentions), a downsampler but on the last. */
  out_ch = boc[0];
  for (int i = 0; i < nb; i++)
    {
      Block *blk = &net->down[i];
      int in_ch = out_ch;

      out_ch = boc[i];
      build_block (blk, cfg->layers_per_block, cfg->down_attention[i]);
      for (int j = 0; j < blk->n_layers; j++)
        {
          pre = g_strdup_printf ("down_blocks.%d.resnets.%d", i, j);
          build_resnet (net, &blk->resnets[j], pre, j == 0 ? in_ch : out_ch,
                        out_ch, 1.0);
          g_free (pre);
          if (blk->attentions != NULL)
            {
              pre = g_strdup_printf ("down_blocks.%d.attentions.%d", i, j);
              build_attn (net, &blk->attentions[j], pre, out_ch, 1.0);
              g_free (pre);
            }
        }
      if (i != nb - 1)
        {
          pre = g_strdup_printf ("down_blocks.%d.downsamplers.0.conv", i);
          blk->sampler = conv_params (net, pre, out_ch, out_ch, 3);
          blk->has_sampler = TRUE;
          g_free (pre);
        }
    }

  /* Mid block: its resnets and attention all use mid_block_scale_factor. */
  build_resnet (net, &net->mid_resnets[0], "mid_block.resnets.0", boc[nb - 1],
                boc[nb - 1], cfg->mid_block_scale_factor);
  if (cfg->mid_attention)
    build_attn (net, &net->mid_attn, "mid_block.attentions.0", boc[nb - 1],
                cfg->mid_block_scale_factor);
  build_resnet (net, &net->mid_resnets[1], "mid_block.resnets.1", boc[nb - 1],
                boc[nb - 1], cfg->mid_block_scale_factor);

  if (is_classifier)
    {
      net->head_norm = norm_params (net, "out.norm", boc[nb - 1]);
      net->head_linear = linear_params (net, "out.linear", boc[nb - 1],
                                        cfg->classifier_classes);
      return net;
    }

  /* Up blocks: channels reversed, layers_per_block + 1 resnets on the
   * concatenated skips, with diffusers' channel arithmetic. */
  out_ch = boc[nb - 1];
  for (int i = 0; i < nb; i++)
    {
      Block *blk = &net->up[i];
      int prev = out_ch;
      int in_ch = boc[MAX (nb - 2 - i, 0)];

      out_ch = boc[nb - 1 - i];
      build_block (blk, cfg->layers_per_block + 1, cfg->up_attention[i]);
      for (int j = 0; j < blk->n_layers; j++)
        {
          int skip = j == blk->n_layers - 1 ? in_ch : out_ch;
          int res_in = j == 0 ? prev : out_ch;

          pre = g_strdup_printf ("up_blocks.%d.resnets.%d", i, j);
          build_resnet (net, &blk->resnets[j], pre, res_in + skip, out_ch,
                        1.0);
          g_free (pre);
          if (blk->attentions != NULL)
            {
              pre = g_strdup_printf ("up_blocks.%d.attentions.%d", i, j);
              build_attn (net, &blk->attentions[j], pre, out_ch, 1.0);
              g_free (pre);
            }
        }
      if (i != nb - 1)
        {
          pre = g_strdup_printf ("up_blocks.%d.upsamplers.0.conv", i);
          blk->sampler = conv_params (net, pre, out_ch, out_ch, 3);
          blk->has_sampler = TRUE;
          g_free (pre);
        }
    }

  net->conv_norm_out = norm_params (net, "conv_norm_out", boc[0]);
  net->conv_out = conv_params (net, "conv_out", boc[0], cfg->out_channels, 3);
  return net;
}

void
df_unet_free (DfUNet *net)
{
  if (net == NULL)
    return;
  for (int i = 0; i < DF_MAX_BLOCKS; i++)
    {
      g_free (net->down[i].resnets);
      g_free (net->down[i].attentions);
      g_free (net->up[i].resnets);
      g_free (net->up[i].attentions);
    }
  g_hash_table_destroy (net->by_name);
  g_array_unref (net->params);
  g_array_unref (net->inits);
  g_free (net->freqs);
  g_free (net);
}

const DfUNetConfig *
df_unet_config (DfUNet *net)
{
  g_return_val_if_fail (net != NULL, NULL);
  return &net->cfg;
}

gboolean
df_unet_is_classifier (DfUNet *net)
{
  g_return_val_if_fail (net != NULL, FALSE);
  return net->classifier;
}

void
df_unet_init (DfUNet *net, guint64 seed)
{
  g_return_if_fail (net != NULL);

  /* One noise stream per parameter (keyed by its index), so a parameter's
   * values do not depend on the sizes of the ones before it. */
  for (guint i = 0; i < net->params->len; i++)
    {
      DfTensor *t = g_array_index (net->params, DfParam, i).tensor;
      ParamInit *init = &g_array_index (net->inits, ParamInit, i);

      switch (init->kind)
        {
        case INIT_FAN_IN:
          {
            float bound = (float) (1.0 / sqrt ((double) init->fan_in));

            df_rng_uniform (seed, i, 0, t->data, t->size);
            for (gsize k = 0; k < t->size; k++)
              t->data[k] = (2.0f * t->data[k] - 1.0f) * bound;
          }
          break;
        case INIT_ONES:
          for (gsize k = 0; k < t->size; k++)
            t->data[k] = 1.0f;
          break;
        case INIT_ZEROS:
          memset (t->data, 0, t->size * sizeof (float));
          break;
        case INIT_NORMAL:
          df_rng_normal (seed, i, 0, t->data, t->size);
          break;
        }
    }
}

const DfParam *
df_unet_params (DfUNet *net, int *n_params)
{
  g_return_val_if_fail (net != NULL, NULL);

  if (n_params != NULL)
    *n_params = net->params->len;
  return (const DfParam *) net->params->data;
}

gsize
df_unet_param_count (DfUNet *net)
{
  gsize n = 0;

  g_return_val_if_fail (net != NULL, 0);

  for (guint i = 0; i < net->params->len; i++)
    n += g_array_index (net->params, DfParam, i).tensor->size;
  return n;
}

/* "...attentions.3.query.weight" -> "...attentions.3.to_q.weight": the
 * names of diffusers' AttentionBlock before 0.14.  NULL if not one. */
static char *
new_attention_name (const char *name)
{
  static const char *const map[][2] = {
    { "query.", "to_q." }, { "key.", "to_k." }, { "value.", "to_v." },
    { "proj_attn.", "to_out.0." },
  };
  const char *at = strstr (name, ".attentions.");
  const char *leaf;

  if (at == NULL)
    return NULL;
  leaf = strchr (at + strlen (".attentions."), '.');
  if (leaf == NULL)
    return NULL;
  leaf++;
  for (guint i = 0; i < G_N_ELEMENTS (map); i++)
    if (g_str_has_prefix (leaf, map[i][0]))
      return g_strdup_printf ("%.*s%s%s", (int) (leaf - name), name,
                              map[i][1], leaf + strlen (map[i][0]));
  return NULL;
}

DfTensor *
df_unet_find_param (DfUNet *net, const char *name)
{
  DfTensor *t;
  char *alias;

  g_return_val_if_fail (net != NULL, NULL);
  g_return_val_if_fail (name != NULL, NULL);

  t = g_hash_table_lookup (net->by_name, name);
  if (t != NULL)
    return t;
  alias = new_attention_name (name);
  if (alias == NULL)
    return NULL;
  t = g_hash_table_lookup (net->by_name, alias);
  g_free (alias);
  return t;
}

/* ---- forward ---- */

/* semb [N,E] is silu (temb), shared by every resnet's time_emb_proj. */
static DfTensor *
resnet_forward (DfUNet *net, DfGraph *g, Resnet *r, DfTensor *x,
                DfTensor *semb)
{
  int groups = net->cfg.norm_num_groups;
  float eps = (float) net->cfg.norm_eps;
  DfTensor *h, *tp, *skip, *y;

  /* h = conv1 (silu (norm1 (x))) + time_emb_proj (silu (temb)) */
  h = df_group_norm_silu (g, x, r->norm1.w, r->norm1.b, groups, eps);
  tp = df_linear (g, semb, r->time_emb_proj.w, r->time_emb_proj.b);
  h = df_conv2d_emb (g, h, r->conv1.w, r->conv1.b, tp, 1, 1, 1); /* [N,Co,H,W] */

  /* (shortcut (x) + conv2 (silu (norm2 (h)))) / output_scale_factor;
   * dropout is 0 */
  h = df_group_norm_silu (g, h, r->norm2.w, r->norm2.b, groups, eps);
  skip = r->conv_shortcut.w != NULL
         ? df_conv2d (g, x, r->conv_shortcut.w, r->conv_shortcut.b, 1, 0, 0)
         : x;
  y = df_conv2d_add (g, h, r->conv2.w, r->conv2.b, skip, 1, 1, 1);
  if (r->inv_scale != 1.0f)
    y = df_scale (g, y, r->inv_scale);
  return y;
}

static DfTensor *
attn_forward (DfUNet *net, DfGraph *g, Attn *a, DfTensor *x)
{
  int h = x->shape[2], w = x->shape[3];
  DfTensor *t, *q, *k, *v, *o, *y;

  /* Tokens of the normalised image: [N,L,C]. */
  t = df_group_norm (g, x, a->group_norm.w, a->group_norm.b,
                     net->cfg.norm_num_groups, (float) net->cfg.norm_eps);
  t = df_to_tokens (g, t);
  q = df_linear (g, t, a->to_q.w, a->to_q.b);
  k = df_linear (g, t, a->to_k.w, a->to_k.b);
  v = df_linear (g, t, a->to_v.w, a->to_v.b);
  o = df_attention (g, q, k, v, a->heads);                   /* [N,L,C] */
  o = df_linear (g, o, a->to_out.w, a->to_out.b);
  o = df_from_tokens (g, o, h, w);                           /* [N,C,H,W] */

  /* Residual, then rescale_output_factor. */
  y = df_add (g, o, x);
  if (a->inv_scale != 1.0f)
    y = df_scale (g, y, a->inv_scale);
  return y;
}

/* temb [N,E] from the timesteps (no gradient: t is not a parameter). */
static DfTensor *
time_embedding (DfUNet *net, DfGraph *g, int n, const float *t,
                const int *labels)
{
  int c0 = net->cfg.block_out_channels[0];
  int half = c0 / 2;
  int shape[2] = { n, c0 };
  DfTensor *proj, *emb;

  /* [N,C0]: [sin, cos] (or [cos, sin] with flip_sin_to_cos), in double;
   * an odd C0 ends in a zero. */
  proj = df_graph_tensor (g, 2, shape);
  for (int i = 0; i < n; i++)
    {
      float *row = proj->data + (gsize) i * c0;
      int sin_at = net->cfg.flip_sin_to_cos ? half : 0;
      int cos_at = net->cfg.flip_sin_to_cos ? 0 : half;

      for (int j = 0; j < half; j++)
        {
          double arg = (double) t[i] * net->freqs[j];

          row[sin_at + j] = (float) sin (arg);
          row[cos_at + j] = (float) cos (arg);
        }
      if (c0 % 2 == 1)
        row[c0 - 1] = 0.0f;
    }

  emb = df_linear (g, proj, net->linear_1.w, net->linear_1.b);
  emb = df_silu (g, emb);
  emb = df_linear (g, emb, net->linear_2.w, net->linear_2.b);  /* [N,E] */
  if (net->class_embedding != NULL)
    emb = df_add (g, emb, df_embedding (g, net->class_embedding, labels, n));
  return emb;
}

DfTensor *
df_unet_forward (DfUNet *net, DfGraph *g, DfTensor *x, const float *t,
                 const int *labels)
{
  const DfUNetConfig *cfg;
  int nb, n, factor, pad_lo, pad_hi, n_skips = 0;
  DfTensor *skips[128];
  DfTensor **stack = skips;
  DfTensor *emb, *semb, *h;

  g_return_val_if_fail (net != NULL && g != NULL && x != NULL, NULL);
  g_return_val_if_fail (t != NULL, NULL);
  cfg = &net->cfg;
  nb = cfg->n_blocks;
  factor = 1 << (nb - 1);
  g_return_val_if_fail (x->ndim == 4 && x->shape[1] == cfg->in_channels,
                        NULL);
  g_return_val_if_fail (x->shape[2] % factor == 0
                        && x->shape[3] % factor == 0, NULL);
  g_return_val_if_fail (cfg->num_class_embeds == 0 || labels != NULL, NULL);
  n = x->shape[0];
  if (cfg->num_class_embeds > 0)
    for (int i = 0; i < n; i++)
      g_return_val_if_fail (labels[i] >= 0
                            && labels[i] < cfg->num_class_embeds, NULL);

  /* The skip stack holds 1 + nb layers_per_block + (nb - 1) tensors. */
  if ((gsize) (1 + nb * (cfg->layers_per_block + 1)) > G_N_ELEMENTS (skips))
    stack = g_new (DfTensor *, 1 + nb * (cfg->layers_per_block + 1));

  /* Time (and class) embedding; every resnet projects silu (temb). */
  emb = time_embedding (net, g, n, t, labels);
  semb = df_silu (g, emb);

  /* Down path: every resnet/attention output and downsample is a skip. */
  h = df_conv2d (g, x, net->conv_in.w, net->conv_in.b, 1, 1, 1);
  stack[n_skips++] = h;
  pad_lo = cfg->downsample_padding;
  pad_hi = cfg->downsample_padding == 0 ? 1 : cfg->downsample_padding;
  for (int i = 0; i < nb; i++)
    {
      Block *blk = &net->down[i];

      for (int j = 0; j < blk->n_layers; j++)
        {
          h = resnet_forward (net, g, &blk->resnets[j], h, semb);
          if (blk->attentions != NULL)
            h = attn_forward (net, g, &blk->attentions[j], h);
          stack[n_skips++] = h;
        }
      if (blk->has_sampler)
        {
          /* downsample_padding 0 pads (0, 1) like diffusers' F.pad. */
          h = df_conv2d (g, h, blk->sampler.w, blk->sampler.b, 2, pad_lo,
                         pad_hi);
          stack[n_skips++] = h;
        }
    }

  /* Mid block. */
  h = resnet_forward (net, g, &net->mid_resnets[0], h, semb);
  if (cfg->mid_attention)
    h = attn_forward (net, g, &net->mid_attn, h);
  h = resnet_forward (net, g, &net->mid_resnets[1], h, semb);

  /* Classifier head: logits [N,K]. */
  if (net->classifier)
    {
      h = df_group_norm_silu (g, h, net->head_norm.w, net->head_norm.b,
                              cfg->norm_num_groups, (float) cfg->norm_eps);
      h = df_mean_hw (g, h);                                  /* [N,C] */
      h = df_linear (g, h, net->head_linear.w, net->head_linear.b);
      if (stack != skips)
        g_free (stack);
      return h;
    }

  /* Up path: each resnet takes concat (h, the latest skip). */
  for (int i = 0; i < nb; i++)
    {
      Block *blk = &net->up[i];

      for (int j = 0; j < blk->n_layers; j++)
        {
          h = df_concat (g, h, stack[--n_skips]);
          h = resnet_forward (net, g, &blk->resnets[j], h, semb);
          if (blk->attentions != NULL)
            h = attn_forward (net, g, &blk->attentions[j], h);
        }
      if (blk->has_sampler)
        {
          h = df_upsample2x (g, h);
          h = df_conv2d (g, h, blk->sampler.w, blk->sampler.b, 1, 1, 1);
        }
    }
  g_assert (n_skips == 0);
  if (stack != skips)
    g_free (stack);

  /* Output: conv_out (silu (conv_norm_out (h))): [N,Cout,H,W]. */
  h = df_group_norm_silu (g, h, net->conv_norm_out.w, net->conv_norm_out.b,
                          cfg->norm_num_groups, (float) cfg->norm_eps);
  return df_conv2d (g, h, net->conv_out.w, net->conv_out.b, 1, 1, 1);
}

/* ---- cost ---- */

/* Multiply-adds x 2 of the convolutions, linears and attention products
 * (the elementwise work is a few percent of it). */
static double
conv_flops (int cin, int cout, int k, int ho, int wo)
{
  return 2.0 * cin * cout * k * k * (double) ho * wo;
}

static double
resnet_flops (Resnet *r, int e, int h, int w)
{
  double f = conv_flops (r->cin, r->cout, 3, h, w)
             + conv_flops (r->cout, r->cout, 3, h, w)
             + 2.0 * e * r->cout;

  if (r->cin != r->cout)
    f += conv_flops (r->cin, r->cout, 1, h, w);
  return f;
}

static double
attn_flops (Attn *a, int h, int w)
{
  double l = (double) h * w;

  /* q, k, v, out projections; q k^T and p v. */
  return 4 * 2.0 * l * a->channels * a->channels
         + 2 * 2.0 * l * l * a->channels;
}

double
df_unet_flops (DfUNet *net, int h, int w)
{
  const DfUNetConfig *cfg;
  int c0, e, nb;
  double f;

  g_return_val_if_fail (net != NULL, 0);
  cfg = &net->cfg;
  c0 = cfg->block_out_channels[0];
  e = 4 * c0;
  nb = cfg->n_blocks;

  f = 2.0 * c0 * e + 2.0 * e * e;
  f += conv_flops (cfg->in_channels, c0, 3, h, w);
  for (int i = 0; i < nb; i++)
    {
      Block *blk = &net->down[i];

      for (int j = 0; j < blk->n_layers; j++)
        {
          f += resnet_flops (&blk->resnets[j], e, h, w);
          if (blk->attentions != NULL)
            f += attn_flops (&blk->attentions[j], h, w);
        }
      if (blk->has_sampler)
        {
          h /= 2;
          w /= 2;
          f += conv_flops (cfg->block_out_channels[i],
                           cfg->block_out_channels[i], 3, h, w);
        }
    }
  f += resnet_flops (&net->mid_resnets[0], e, h, w)
       + resnet_flops (&net->mid_resnets[1], e, h, w);
  if (cfg->mid_attention)
    f += attn_flops (&net->mid_attn, h, w);
  if (net->classifier)
    return f + 2.0 * cfg->block_out_channels[nb - 1]
               * cfg->classifier_classes;

  for (int i = 0; i < nb; i++)
    {
      Block *blk = &net->up[i];
      int c = cfg->block_out_channels[nb - 1 - i];

      for (int j = 0; j < blk->n_layers; j++)
        {
          f += resnet_flops (&blk->resnets[j], e, h, w);
          if (blk->attentions != NULL)
            f += attn_flops (&blk->attentions[j], h, w);
        }
      if (blk->has_sampler)
        {
          h *= 2;
          w *= 2;
          f += conv_flops (c, c, 3, h, w);
        }
    }
  return f + conv_flops (c0, cfg->out_channels, 3, h, w);
}
