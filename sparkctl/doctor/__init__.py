"""Doctor: SM121 knowledge as a data table (sparkctl/data/rules.yaml) evaluated, purely, against facts."""
