/* test-dialog.c: the GTK3 dialog of diffuse-ui under Xvfb.  Values set
 * through its widgets reach the parameter struct; a job runs in the
 * background with progress; Cancel during sampling leaves nothing.
 *
 * With DIFFUSE_SCREENSHOT=file.png (and DIFFUSE_WEIGHTS for real weights)
 * it instead draws the class-guided dialog in mid-sampling into that file,
 * for the README.
 */
#include <glib/gstdio.h>
#include <gtk/gtk.h>
#include <string.h>

#include "dialog.h"
#include "plugin-fixture.h"

static char *tmpdir;

static GtkWidget *
widget (DfDialog *d, const char *name)
{
  GtkWidget *w = df_dialog_get_widget (d, name);

  g_assert_nonnull (w);
  return w;
}

static void
test_generate_widgets (void)
{
  DfPluginParams p;
  DfDialog *d;
  int old;

  df_plugin_params_init (&p, DF_PROC_GENERATE);
  d = df_dialog_new (&p);

  gtk_spin_button_set_value (GTK_SPIN_BUTTON (widget (d, "steps")), 77);
  g_assert_cmpint (p.steps, ==, 77);
  gtk_range_set_value (GTK_RANGE (widget (d, "eta")), 0.25);
  g_assert_cmpfloat_with_epsilon (p.eta, 0.25, 1e-9);
  gtk_spin_button_set_value (GTK_SPIN_BUTTON (widget (d, "count")), 5);
  g_assert_cmpint (p.count, ==, 5);
  gtk_spin_button_set_value (GTK_SPIN_BUTTON (widget (d, "seed")), 42);
  g_assert_cmpint (p.seed, ==, 42);

  /* The dice draws a new non-negative seed into the spin and the params. */
  old = p.seed;
  gtk_button_clicked (GTK_BUTTON (widget (d, "dice")));
  g_assert_cmpint (p.seed, >=, 0);
  g_assert_cmpint (p.seed, !=, old);
  g_assert_cmpint (p.seed, ==, gtk_spin_button_get_value_as_int (
                                 GTK_SPIN_BUTTON (widget (d, "seed"))));

  /* DDPM has no eta: the slider goes insensitive. */
  gtk_combo_box_set_active (GTK_COMBO_BOX (widget (d, "sampler")), 1);
  g_assert_cmpint (p.sampler, ==, 1);
  g_assert_false (gtk_widget_get_sensitive (widget (d, "eta")));

  /* Spins clamp to the spec's ranges. */
  gtk_spin_button_set_value (GTK_SPIN_BUTTON (widget (d, "steps")), 5000);
  g_assert_cmpint (p.steps, <=, DF_MAX_STEPS);
  gtk_spin_button_set_value (GTK_SPIN_BUTTON (widget (d, "steps")), 0);
  g_assert_cmpint (p.steps, ==, 1);

  /* Generate has no class: the spec gives it no class argument. */
  g_assert_null (df_dialog_get_widget (d, "class"));
  df_dialog_free (d);
}

static void
test_class_guided_widgets (void)
{
  DfPluginParams p;
  DfDialog *d;
  GtkComboBox *cls;
  GtkTreeModel *model;
  GtkTreeIter iter;
  char *text;

  df_plugin_params_init (&p, DF_PROC_CLASS_GUIDED);
  d = df_dialog_new (&p);

  /* The class combo lists the model's class names. */
  cls = GTK_COMBO_BOX (widget (d, "class"));
  model = gtk_combo_box_get_model (cls);
  g_assert_cmpint (gtk_tree_model_iter_n_children (model, NULL), ==,
                   FIXTURE_N_CLASSES);
  g_assert_true (gtk_tree_model_iter_nth_child (model, &iter, NULL, 2));
  gtk_tree_model_get (model, &iter, 0, &text, -1);
  g_assert_cmpstr (text, ==, "Sneaker");
  g_free (text);

  gtk_combo_box_set_active_id (cls, "2");
  g_assert_cmpint (p.class_label, ==, 2);
  gtk_combo_box_set_active (GTK_COMBO_BOX (widget (d, "guidance")), 1);
  g_assert_cmpint (p.guidance, ==, 1);
  g_assert_true (gtk_widget_get_sensitive (widget (d, "classifier-file")));
  gtk_spin_button_set_value (GTK_SPIN_BUTTON (widget (d, "scale")), 4.5);
  g_assert_cmpfloat_with_epsilon (p.scale, 4.5, 1e-9);

  /* The model's T (100) bounds the steps. */
  gtk_spin_button_set_value (GTK_SPIN_BUTTON (widget (d, "steps")), 500);
  g_assert_cmpint (p.steps, ==, FIXTURE_T);
  df_dialog_free (d);
}

static void
test_interpolate_widgets (void)
{
  DfPluginParams p;
  DfDialog *d;

  df_plugin_params_init (&p, DF_PROC_INTERPOLATE);
  d = df_dialog_new (&p);

  gtk_spin_button_set_value (GTK_SPIN_BUTTON (widget (d, "seed")), 7);
  gtk_spin_button_set_value (GTK_SPIN_BUTTON (widget (d, "seed-b")), 99);
  gtk_spin_button_set_value (GTK_SPIN_BUTTON (widget (d, "frames")), 12);
  g_assert_cmpint (p.seed, ==, 7);
  g_assert_cmpint (p.seed_b, ==, 99);
  g_assert_cmpint (p.frames, ==, 12);

  /* "None" first, then the classes. */
  gtk_combo_box_set_active_id (GTK_COMBO_BOX (widget (d, "class")), "1");
  g_assert_cmpint (p.class_label, ==, 1);
  gtk_combo_box_set_active_id (GTK_COMBO_BOX (widget (d, "class")), "-1");
  g_assert_cmpint (p.class_label, ==, -1);

  /* Interpolation is DDIM at eta 0: neither is offered. */
  g_assert_null (df_dialog_get_widget (d, "eta"));
  g_assert_null (df_dialog_get_widget (d, "sampler"));
  df_dialog_free (d);
}

/* ---- running ---- */

typedef struct {
  DfDialog *d;
  int       steps_at_cancel;
  gboolean  cancelled;
  gboolean  saw_idle_after_cancel;
  double    last_fraction;
  int       hook_calls;
} Run;

static void
cancel_on_first_step (gpointer data, double fraction)
{
  Run *r = data;

  r->hook_calls++;
  r->last_fraction = fraction;
  if (!r->cancelled && fraction > 0.0 && fraction < 1.0)
    {
      r->cancelled = TRUE;
      r->steps_at_cancel = df_dialog_get_steps_seen (r->d);
      gtk_button_clicked (GTK_BUTTON (widget (r->d, "cancel")));
    }
}

static gboolean
click_generate (gpointer data)
{
  Run *r = data;

  gtk_button_clicked (GTK_BUTTON (widget (r->d, "generate")));
  g_assert_cmpint (df_dialog_get_state (r->d), ==, DF_DIALOG_RUNNING);
  /* Settings are locked while sampling. */
  g_assert_false (gtk_widget_is_sensitive (widget (r->d, "steps")));
  return G_SOURCE_REMOVE;
}

/* Once the cancelled job is over, close the dialog with Cancel. */
static gboolean
close_when_idle (gpointer data)
{
  Run *r = data;

  if (!r->cancelled || df_dialog_get_state (r->d) != DF_DIALOG_IDLE)
    return G_SOURCE_CONTINUE;
  r->saw_idle_after_cancel = TRUE;
  gtk_button_clicked (GTK_BUTTON (widget (r->d, "cancel")));
  return G_SOURCE_REMOVE;
}

static void
test_cancel_leaves_nothing (void)
{
  DfPluginParams p;
  Run r = { 0 };
  DfJob *job;
  const GError *e;
  int steps_after;
  const char *status;

  df_plugin_params_init (&p, DF_PROC_GENERATE);
  p.steps = FIXTURE_T;          /* long enough to cancel in the middle */
  p.count = 4;
  p.seed = 1;
  r.d = df_dialog_new (&p);
  df_dialog_set_progress_hook (r.d, cancel_on_first_step, &r);
  g_idle_add (click_generate, &r);
  g_timeout_add (5, close_when_idle, &r);

  job = df_dialog_run (r.d);

  g_assert_null (job);
  g_assert_true (r.cancelled);
  g_assert_true (r.saw_idle_after_cancel);
  g_assert_cmpint (df_dialog_get_state (r.d), ==, DF_DIALOG_CLOSED);
  e = df_dialog_get_last_error (r.d);
  g_assert_error ((GError *) e, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CANCELLED);

  /* Stopped within one denoising step of the click. */
  steps_after = df_dialog_get_steps_seen (r.d);
  g_test_message ("steps done at cancel %d, at the end %d (of %d)",
                  r.steps_at_cancel, steps_after, p.steps);
  g_assert_cmpint (steps_after, <=, r.steps_at_cancel + 1);
  g_assert_cmpint (steps_after, <, p.steps);

  status = gtk_label_get_text (GTK_LABEL (widget (r.d, "status")));
  g_assert_cmpstr (status, ==, "Cancelled: nothing was added.");
  g_assert_cmpfloat (gtk_progress_bar_get_fraction (
                       GTK_PROGRESS_BAR (widget (r.d, "progress"))), ==, 0.0);
  df_dialog_free (r.d);
}

static void
record_fraction (gpointer data, double fraction)
{
  Run *r = data;

  /* Fractions only grow, and end at 1. */
  g_assert_cmpfloat (fraction, >=, r->last_fraction);
  r->last_fraction = fraction;
  r->hook_calls++;
}

static void
test_generate_returns_job (void)
{
  DfPluginParams p;
  Run r = { 0 };
  DfJob *job;
  GdkPixbuf *preview;

  df_plugin_params_init (&p, DF_PROC_GENERATE);
  p.steps = 3;
  p.count = 2;
  p.seed = 5;
  r.d = df_dialog_new (&p);
  df_dialog_set_progress_hook (r.d, record_fraction, &r);
  g_idle_add (click_generate, &r);

  job = df_dialog_run (r.d);

  g_assert_nonnull (job);
  g_assert_cmpint (df_dialog_get_state (r.d), ==, DF_DIALOG_DONE);
  g_assert_null (df_dialog_get_last_error (r.d));
  g_assert_cmpint (job->n, ==, 2);
  g_assert_nonnull (job->images);
  g_assert_cmpint (job->params.seed, ==, 5);
  g_assert_cmpint (df_dialog_get_steps_seen (r.d), ==, 3);
  g_assert_cmpfloat (r.last_fraction, ==, 1.0);
  g_assert_cmpint (r.hook_calls, >=, 1);

  /* The preview shows a picture of the model's size, scaled up. */
  preview = gtk_image_get_pixbuf (GTK_IMAGE (widget (r.d, "preview")));
  g_assert_nonnull (preview);
  g_assert_cmpint (gdk_pixbuf_get_width (preview), ==,
                   FIXTURE_SIZE * (112 / FIXTURE_SIZE));
  df_job_free (job);
  df_dialog_free (r.d);
}

static void
test_bad_settings_stay_idle (void)
{
  DfPluginParams p;
  DfDialog *d;
  const GError *e;

  df_plugin_params_init (&p, DF_PROC_GENERATE);
  df_plugin_params_set_path (p.model, "/nonexistent/model.safetensors");
  d = df_dialog_new (&p);
  df_dialog_generate (d);
  g_assert_cmpint (df_dialog_get_state (d), ==, DF_DIALOG_IDLE);
  e = df_dialog_get_last_error (d);
  g_assert_error ((GError *) e, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CALLING);
  g_assert_nonnull (strstr (gtk_label_get_text (
                      GTK_LABEL (widget (d, "status"))), "does not exist"));
  df_dialog_free (d);
}

/* ---- screenshot for the README ---- */

static void
stop_half_way (gpointer data, double fraction)
{
  if (fraction >= 0.6)
    g_main_loop_quit (data);
}

static int
screenshot (const char *path)
{
  DfPluginParams p;
  DfDialog *d;
  GtkWidget *win;
  GMainLoop *loop = g_main_loop_new (NULL, FALSE);
  cairo_surface_t *s;
  cairo_t *cr;
  int w, h;

  df_plugin_params_init (&p, DF_PROC_CLASS_GUIDED);
  p.class_label = 7;
  p.seed = 7;
  p.steps = 50;
  d = df_dialog_new (&p);
  win = df_dialog_get_window (d);
  gtk_widget_show (win);
  df_dialog_set_progress_hook (d, stop_half_way, loop);
  df_dialog_generate (d);
  g_main_loop_run (loop);
  while (gtk_events_pending ())
    gtk_main_iteration ();

  w = gtk_widget_get_allocated_width (win);
  h = gtk_widget_get_allocated_height (win);
  s = cairo_image_surface_create (CAIRO_FORMAT_ARGB32, w, h);
  cr = cairo_create (s);
  gtk_widget_draw (win, cr);
  cairo_destroy (cr);
  cairo_surface_write_to_png (s, path);
  cairo_surface_destroy (s);
  df_dialog_free (d);
  g_main_loop_unref (loop);
  g_printerr ("wrote %s (%dx%d)\n", path, w, h);
  return 0;
}

int
main (int argc, char **argv)
{
  const char *shot = g_getenv ("DIFFUSE_SCREENSHOT");
  GError *error = NULL;
  int rc;

  if (shot != NULL)
    {
      gtk_init (&argc, &argv);
      if (g_getenv ("DIFFUSE_WEIGHTS") == NULL)
        {
          tmpdir = g_dir_make_tmp ("diffuse-dialog-XXXXXX", &error);
          g_assert_no_error (error);
          if (!fixture_write_models (tmpdir, &error))
            g_error ("cannot write the test models: %s", error->message);
          g_setenv ("DIFFUSE_WEIGHTS", tmpdir, TRUE);
        }
      return screenshot (shot);
    }

  gtk_test_init (&argc, &argv, NULL);
  tmpdir = g_dir_make_tmp ("diffuse-dialog-XXXXXX", &error);
  g_assert_no_error (error);
  if (!fixture_write_models (tmpdir, &error))
    g_error ("cannot write the test models: %s", error->message);
  g_setenv ("DIFFUSE_WEIGHTS", tmpdir, TRUE);

  g_test_add_func ("/ui/dialog/generate-widgets-set-params",
                   test_generate_widgets);
  g_test_add_func ("/ui/dialog/class-guided-widgets-set-params",
                   test_class_guided_widgets);
  g_test_add_func ("/ui/dialog/interpolate-widgets-set-params",
                   test_interpolate_widgets);
  g_test_add_func ("/ui/dialog/generate-returns-job",
                   test_generate_returns_job);
  g_test_add_func ("/ui/dialog/cancel-leaves-nothing",
                   test_cancel_leaves_nothing);
  g_test_add_func ("/ui/dialog/bad-settings-stay-idle",
                   test_bad_settings_stay_idle);
  rc = g_test_run ();

  {
    char *model = g_build_filename (tmpdir, "fashion-mnist.safetensors", NULL);
    char *clf = g_build_filename (tmpdir,
                                  "fashion-mnist-classifier.safetensors",
                                  NULL);

    g_unlink (model);
    g_unlink (clf);
    g_rmdir (tmpdir);
    g_free (model);
    g_free (clf);
  }
  return rc;
}
