"""Image quality and standard planes: the SonoNet-16 plane gate (:mod:`.planes`).

It sits below the prediction path (:mod:`fetalscan.inference`), which runs the gate on
the same decoded images as the classifier when asked."""
