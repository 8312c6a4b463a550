"""Fetal head biometry: ellipse geometry and gestational age (:mod:`.geometry`), the head segmenter
(:mod:`.segmenter`), its training and cross-validation (:mod:`.training`), HC18-style scoring
(:mod:`.scoring`) and measuring new images (:mod:`.predict`). Measurements support, and never
replace, the sonographer's."""
