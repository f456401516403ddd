"""What a run writes for people: report.json, rounds.json and the plots."""
