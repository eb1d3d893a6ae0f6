/* cli.h: what the `diffuse` commands share: errors, model and weights
 * look-up, PNG and .npy files, output written only when a job succeeded,
 * and the progress line.
 */
#pragma once

#include <gio/gio.h>

#include "model.h"

G_BEGIN_DECLS

#define CLI_ERROR (cli_error_quark ())
GQuark cli_error_quark (void);

typedef enum { CLI_ERROR_INVALID, CLI_ERROR_IO } CliError;

/* Each command: argv[0] is the command name.  Returns the exit status. */
int       cli_generate      (int argc, char **argv);
int       cli_interpolate   (int argc, char **argv);
int       cli_info          (int argc, char **argv);
int       cli_schedule      (int argc, char **argv);
int       cli_eps           (int argc, char **argv);
int       cli_train         (int argc, char **argv);
int       cli_eval          (int argc, char **argv);

/* Print "diffuse: MESSAGE" as one line on stderr and return 1. */
int       cli_fail          (GError *error);
int       cli_failf         (const char *format, ...) G_GNUC_PRINTF (1, 2);

/* Parse the command's options; --help prints and exits 0. */
gboolean  cli_parse         (const char *command, const char *params,
                             const char *summary, GOptionEntry *entries,
                             int *argc, char ***argv, GError **error);

/* Where a shipped weights file is: $DIFFUSE_WEIGHTS (a folder, or the file
 * itself for the default model), ./weights, the installed data folder, the
 * source tree.  NULL with an error listing the places tried. */
char     *cli_find_weights  (const char *file, GError **error);
/* path, or the shipped file when path is NULL. */
DfModel  *cli_load_model    (const char *path, const char *shipped,
                             GError **error);
#define CLI_UNET_FILE        "fashion-mnist.safetensors"
#define CLI_CLASSIFIER_FILE  "fashion-mnist-classifier.safetensors"

/* GOption cannot say whether an option was given: a numeric option that
 * must be told apart from its default starts at one of these, values nobody
 * types, and gets its default after parsing.  (A string option starts at
 * NULL; GOption drops a non-NULL starting string without freeing it.) */
#define CLI_INT_UNSET     G_MININT
#define CLI_DOUBLE_UNSET  (-G_MAXDOUBLE)

/* Parsers for option values; what names the option in messages. */
gboolean  cli_parse_u64     (const char *what, const char *s, guint64 *out,
                             GError **error);
gboolean  cli_parse_int_list(const char *what, const char *s, int *out,
                             int max, int *n, GError **error);
/* A guidance interval "LO,HI" of noise levels sigma, 0 <= LO < HI; HI may
 * be "inf". */
gboolean  cli_parse_interval(const char *what, const char *s, double *lo,
                             double *hi, GError **error);
/* Guidance options that would guide no step, given p as it will sample
 * on schedule s: an interval (the option's text, or NULL if not given) at
 * free guidance scale 1, which is the conditional prediction everywhere,
 * and a given interval or scale whose interval holds none of the steps'
 * noise levels.  With neither given and the default interval holding none
 * of them, sampling goes on conditionally; with note, a line on stderr
 * says so. */
gboolean  cli_check_guidance_acts (const DfSchedule *s,
                                   const DfSampleParams *p,
                                   const char *interval, gboolean scale_given,
                                   gboolean note, GError **error);
/* path is a folder (for option), or an error that says what it is. */
gboolean  cli_check_folder  (const char *option, const char *path,
                             GError **error);
/* A class given as a name or an index, checked against the model. */
gboolean  cli_parse_class   (DfModel *m, const char *s, int *label,
                             GError **error);


/* An IDX folder: it holds PREFIX-images-idx3-ubyte[.gz] (prefix "train" or
 * "t10k"). */
gboolean  cli_is_idx_folder (const char *dir, const char *prefix);

/* A file a command will write: its folder exists and path is not a folder.
 * Checked before the work, so hours of it do not end in "cannot write". */
gboolean  cli_check_output_file (const char *option, const char *path,
                                 GError **error);
/* The folder a command will write its files into (created at the end if
 * missing): an existing folder that can be written, or a path whose
 * nearest existing part is a folder where it can be created.  Checked
 * before the work, like cli_check_output_file. */
gboolean  cli_check_output_dir  (const char *option, const char *dir,
                                 GError **error);
/* Whether paths a and b name one file or folder: the same name written two
 * ways, through links, or a hard link. */
gboolean  cli_same_file         (const char *a, const char *b);
/* GLib's atomic writes name their temporary file, PATH.XXXXXX, in their
 * errors: put back PATH, the name the user gave, in error's message. */
void      cli_error_restore_path (GError *error, const char *path);

/* ---- images ---- */

/* One image x[C,H,W] in [-1, 1] as PNG bytes: 8-bit gray for C = 1, RGB
 * for C = 3.  Pixel = round((x + 1) * 127.5) clamped to [0, 255]. */
GBytes   *cli_png_encode    (const float *x, int c, int h, int w,
                             GError **error);
/* x[N,C,H,W] tiled cols wide with gap pixels of white between tiles, into a
 * new [C,GH,GW] buffer. */
float    *cli_tile          (const float *x, int n, int c, int h, int w,
                             int cols, int gap, int *gh, int *gw);
/* Columns of a near-square grid of n tiles. */
int       cli_grid_cols     (int n);

/* ---- output written at the end, all or nothing ---- */

typedef struct _CliOutput CliOutput;

CliOutput *cli_output_new    (const char *dir);
void       cli_output_free   (CliOutput *o);
/* Takes bytes. */
void       cli_output_add    (CliOutput *o, const char *name, GBytes *bytes);
/* Create the folder and write each file atomically (temporary name, then
 * rename); on a failure remove the files already written. */
gboolean   cli_output_commit (CliOutput *o, GError **error);
/* Images x[N,C,H,W] as DIR/0000.png... plus an overview (grid or strip). */
gboolean   cli_output_images (CliOutput *o, const float *x, int n, int c,
                              int h, int w, const char *overview, int cols,
                              GError **error);

/* ---- .npy (version 1.0, '<f4', C order, 4-D) ---- */

float    *cli_npy_read      (const char *path, int shape[4], GError **error);
GBytes   *cli_npy_encode    (const float *x, const int shape[4]);

/* ---- progress on stderr ---- */

typedef struct {
  const char *label;
  int         total;
  int         done;
  gboolean    quiet;
  gboolean    tty;
  gint64      start, last_print;   /* monotonic microseconds */
  int         width;               /* of the last line, for \r overwriting */
} CliProgress;

void      cli_progress_init   (CliProgress *p, const char *label, int total,
                               gboolean quiet);
/* Count one more step; prints at most ~10 times a second on a tty and once
 * a second otherwise (always the last step). */
void      cli_progress_step   (CliProgress *p);
/* A line with free text (training), same pacing rules unless force. */
void      cli_progress_text   (CliProgress *p, const char *text, gboolean force);
void      cli_progress_finish (CliProgress *p);
/* A DfProgressFunc that counts steps into a CliProgress. */
void      cli_progress_sampler(gpointer data, int step, int total,
                               const float *x0, int n);
/* "1:02:03" or "2:03". */
char     *cli_format_duration (double seconds);

/* Cancelled on SIGINT/SIGTERM: long jobs stop at the next step. */
GCancellable *cli_cancellable (void);

G_END_DECLS
