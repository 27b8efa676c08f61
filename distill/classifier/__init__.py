"""Classifier and feature distillation (task: classifier): any `torch.nn.Module` teacher and student,
features taken by forward hooks on named modules, the classic objectives of `distill.losses.classic`
and `distill.losses.features`, and the three-row report (teacher / alone / distilled)."""
