/* schedule.h: noise schedules and timestep spacings, in double.
 *
 * T is the number of training timesteps; ab_t = prod_{i<=t} (1 - beta_i).
 */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

#define DF_SCHEDULE_ERROR (df_schedule_error_quark ())
GQuark df_schedule_error_quark (void);

typedef enum {
  DF_SCHEDULE_ERROR_INVALID     /* a schedule or step count out of range */
} DfScheduleError;

typedef enum {
  DF_BETA_LINEAR,         /* linspace(1e-4, 0.02) x 1000/T (Ho et al.) */
  DF_BETA_SCALED_LINEAR,  /* linspace(sqrt(start), sqrt(end))^2 */
  DF_BETA_COSINE          /* Nichol & Dhariwal, s = 0.008, beta <= 0.999 */
} DfBetaSchedule;

typedef enum {
  DF_SPACING_LEADING,
  DF_SPACING_TRAILING,
  DF_SPACING_LINSPACE
} DfSpacing;

typedef struct {
  DfBetaSchedule kind;
  int            T;
  double         beta_start, beta_end;   /* linear kinds, before scaling */
  double        *betas;                  /* [T] */
  double        *alphas_cumprod;         /* [T] */
} DfSchedule;

/* beta_start/beta_end <= 0 take the kind's defaults (1e-4, 0.02 for linear;
 * 0.00085, 0.012 for scaled_linear). */
DfSchedule  *df_schedule_new          (DfBetaSchedule kind, int T,
                                       double beta_start, double beta_end,
                                       GError **error);
void         df_schedule_free         (DfSchedule *s);

/* Exactly steps distinct timesteps in [0, T-1], descending, into out[steps].
 * steps must be in [1, T].  The lists are diffusers' (DDIMScheduler,
 * steps_offset 0): leading = arange(S) * (T // S), reversed; trailing =
 * round(arange(T, 0, -T/S)) - 1, of which only the first S entries are kept
 * (numpy's arange yields S + 1 for some S, the extra one being -1); linspace =
 * round(linspace(0, T-1, S)), reversed.  Should a formula ever give a
 * repeated or out-of-range entry, the list is repaired deterministically:
 * clamped to [0, T-1], then each entry raised to one above its successor
 * (from the end), then lowered to one below its predecessor (from the top). */
gboolean     df_schedule_timesteps    (const DfSchedule *s, int steps,
                                       DfSpacing spacing, int *out,
                                       GError **error);

/* Names are diffusers' ("linear", "scaled_linear", "squaredcos_cap_v2");
 * parse also takes "cosine".  Spacings: "leading", "trailing", "linspace". */
const char  *df_beta_schedule_name    (DfBetaSchedule kind);
gboolean     df_beta_schedule_parse   (const char *name, DfBetaSchedule *out);
const char  *df_spacing_name          (DfSpacing spacing);
gboolean     df_spacing_parse         (const char *name, DfSpacing *out);

G_END_DECLS
