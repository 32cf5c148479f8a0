// MathJax 3 for every page, served by the site itself (assets/mathjax/, vendored at build time
// by docs/_hooks.py): Markdown pages and docstrings (pymdownx.arithmatex writes \(…\) and \[…\])
// and notebooks ($…$ and $$…$$ in their Markdown cells). Code (<pre>, <code>) is never touched.
window.MathJax = {
  tex: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: { ignoreHtmlClass: "tex2jax_ignore", processHtmlClass: "tex2jax_process" },
};

// With instant navigation, typeset the new page's content once MathJax has started.
document$.subscribe(() => {
  if (window.MathJax.startup && window.MathJax.startup.promise) {
    MathJax.startup.promise = MathJax.startup.promise.then(() => {
      MathJax.typesetClear();
      return MathJax.typesetPromise();
    });
  }
});
