"""Self-contained HTML reports: explanations side by side, metrics, sanity checks, findings."""

from .html import Section, explanation_section, figure_section, metrics_section, render_report, sanity_section, table_html, text_section, write_report

__all__ = [
    "Section", "explanation_section", "figure_section", "metrics_section", "render_report", "sanity_section",
    "table_html", "text_section", "write_report",
]
