"""Tk views of PNG figures for Scipion viewers.

`PngView` is a pyworkflow View whose `show()` opens one Toplevel window browsing one or more PNG files
(Previous / Next buttons and the arrow keys when there are several); images larger than 90% of the screen
are shrunk to fit. Nothing here runs before `show()` is called, so views can be built headless.
"""
import os

from pyworkflow.viewer import View


def fit_size(size, bounds):
    """(width, height) of an image of `size` shrunk (never enlarged) to fit inside `bounds`, aspect kept."""
    w, h = size
    bw, bh = bounds
    scale = min(1.0, bw / float(w), bh / float(h))
    return max(1, int(w * scale)), max(1, int(h * scale))


class PngView(View):
    """One window showing PNG figures, one at a time.

    paths: a PNG path or a list of them; title: window title; tkParent: the Scipion window to attach to
    (None: a window of its own, with its own Tk root when none exists).
    """

    def __init__(self, paths, title='cryopick', tkParent=None, **kwargs):
        View.__init__(self)
        self._paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self._title = title
        self._tkParent = tkParent

    def getPaths(self):
        return list(self._paths)

    def getTitle(self):
        return self._title

    def show(self):
        import tkinter as tk
        from PIL import Image, ImageTk

        paths = [p for p in self._paths if os.path.exists(p)]
        if not paths:
            return
        own_root = None
        parent = self._tkParent
        if parent is None:
            parent = tk._default_root
            if parent is None:
                own_root = parent = tk.Tk()
                own_root.withdraw()
        window = tk.Toplevel(parent)
        window.title(self._title)
        bounds = (int(window.winfo_screenwidth() * 0.9), int(window.winfo_screenheight() * 0.85))
        label = tk.Label(window)
        label.pack(side=tk.TOP, fill=tk.BOTH, expand=True)
        caption = tk.StringVar(window)
        state = {'index': 0, 'photo': None}

        def display(index):
            state['index'] = index % len(paths)
            path = paths[state['index']]
            with Image.open(path) as img:
                img = img.convert('RGB')
                img = img.resize(fit_size(img.size, bounds), Image.LANCZOS) if img.size != fit_size(img.size, bounds) \
                    else img.copy()
            state['photo'] = ImageTk.PhotoImage(img, master=window)  # keep a reference: Tk does not
            label.configure(image=state['photo'])
            caption.set(f'{state["index"] + 1} / {len(paths)}   {os.path.basename(path)}')

        if len(paths) > 1:
            bar = tk.Frame(window)
            bar.pack(side=tk.BOTTOM, fill=tk.X)
            tk.Button(bar, text='◀ Previous', command=lambda: display(state['index'] - 1)).pack(side=tk.LEFT)
            tk.Button(bar, text='Next ▶', command=lambda: display(state['index'] + 1)).pack(side=tk.RIGHT)
            tk.Label(bar, textvariable=caption).pack(side=tk.LEFT, expand=True)
            window.bind('<Left>', lambda _e: display(state['index'] - 1))
            window.bind('<Right>', lambda _e: display(state['index'] + 1))
        display(0)
        if own_root is not None:
            window.protocol('WM_DELETE_WINDOW', own_root.destroy)
            own_root.mainloop()


def png_views(paths, title='cryopick', tkParent=None):
    """The views to return from a Viewer's `_visualize` for these figures: one browsing window (none when
    there is nothing to show)."""
    paths = [p for p in paths if p]
    return [PngView(paths, title=title, tkParent=tkParent)] if paths else []


def show_pngs(paths, title='cryopick', tkParent=None):
    """Open the figures now (outside a Viewer, e.g. from a `scipion3 python` script)."""
    for view in png_views(paths, title, tkParent):
        view.show()
